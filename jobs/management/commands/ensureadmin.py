"""Make sure an admin user and its API token exist, and print how to log in."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create the admin user (with a generated password) if none exists, and print how to log in."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="admin")
        parser.add_argument("--url", default="http://127.0.0.1:8000")

    def handle(self, *args: Any, username: str, url: str, **options: Any) -> None:
        users = get_user_model()
        user = users.objects.filter(username=username).first()
        if user is None:
            password = secrets.token_urlsafe(12)
            user = users.objects.create_superuser(username, f"{username}@localhost", password)
            login = f"user {username!r}, password {password!r} (shown once; change it in the admin)"
        else:
            login = f"user {username!r} (forgot the password? python manage.py changepassword {username})"
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"Admin:   {url}/admin/  {login}")
        self.stdout.write(f"API:     {url}/jobs  with header  Authorization: Token {token.key}")
        self.stdout.write(f"Docs:    {url}/docs")
