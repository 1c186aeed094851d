"""URL routes: the admin, the REST API at the root, and the API docs."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView

from jobs.api.views import RedocView, SwaggerView, redoc_bundle

# Each app's admin.py: settings use SimpleAdminConfig, which leaves this to the URLs.
admin.autodiscover()

urlpatterns = [
    path("", RedirectView.as_view(url="/docs", permanent=False)),
    path("admin/", admin.site.urls),
    path("api-auth/", include("rest_framework.urls")),
    path("schema", SpectacularAPIView.as_view(), name="schema"),
    path("schema/", SpectacularAPIView.as_view()),
    path("docs", SwaggerView.as_view(url_name="schema"), name="docs"),
    path("docs/", SwaggerView.as_view(url_name="schema")),
    path("redoc", RedocView.as_view(url_name="schema"), name="redoc"),
    path("redoc/redoc.standalone.js", redoc_bundle, name="redoc-bundle"),
    path("redoc/", RedocView.as_view(url_name="schema")),
    path("", include("jobs.api.urls")),
]

# Errors Django answers itself (an unknown URL, a bad Host header, a crash): JSON under the API,
# Django's pages for the admin, the login pages and the docs.
handler400 = "jobs.api.errors.bad_request"
handler403 = "jobs.api.errors.permission_denied"
handler404 = "jobs.api.errors.not_found"
handler500 = "jobs.api.errors.server_error"
