from django.urls import path
from rest_framework.routers import SimpleRouter

from .views import CronPreviewView, HealthView, JobRunViewSet, JobTypesView, JobViewSet, MetricsView

router = SimpleRouter()
router.trailing_slash = "/?"  # the seed calls /jobs and /jobs/1; /jobs/ works too
router.register("jobs", JobViewSet, basename="job")
router.register("runs", JobRunViewSet, basename="jobrun")

urlpatterns = [
    path("job-types", JobTypesView.as_view(), name="job-types"),
    path("job-types/", JobTypesView.as_view()),
    path("cron/preview", CronPreviewView.as_view(), name="cron-preview"),
    path("cron/preview/", CronPreviewView.as_view()),
    path("health", HealthView.as_view(), name="health"),
    path("health/", HealthView.as_view()),
    path("metrics", MetricsView.as_view(), name="metrics"),
    path("metrics/", MetricsView.as_view()),
    *router.urls,
]
