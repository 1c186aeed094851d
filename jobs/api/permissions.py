"""Django model permissions, with viewing and running jobs mapped to permissions too."""

from typing import Any

from rest_framework.permissions import DjangoModelPermissions

_VIEW = ["%(app_label)s.view_%(model_name)s"]


class ModelPermissions(DjangoModelPermissions):
    """Reading needs the view permission; run now, pause and resume need change."""

    perms_map = {**DjangoModelPermissions.perms_map, "GET": _VIEW, "HEAD": _VIEW, "OPTIONS": _VIEW}
    change_actions = frozenset({"run", "pause", "resume"})

    def has_permission(self, request: Any, view: Any) -> bool:
        if getattr(view, "action", None) in self.change_actions:
            if not request.user or not request.user.is_authenticated:
                return False
            model = view.get_queryset().model
            return request.user.has_perm(f"{model._meta.app_label}.change_{model._meta.model_name}")
        return super().has_permission(request, view)
