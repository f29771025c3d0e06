"""Masked personal data: enough for an officer to tell requests apart, too little to
identify anyone (R29). Revealing the whole value is a separate, audited action."""

from __future__ import annotations

from typing import Any


def mask_email(email: str) -> str:
    """`dana.reyes@example.com` -> `d***@example.com`."""
    local, at, domain = email.partition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


def mask_name(name: str) -> str:
    """`Dana Reyes` -> `D. R.`"""
    return " ".join(f"{part[0].upper()}." for part in name.split() if part) or "***"


def mask_phone(phone: str) -> str:
    """Only the last two digits: `+1 555 0100` -> `***00`."""
    digits = [c for c in phone if c.isdigit()]
    return "***" + "".join(digits[-2:])


def mask_subject(subject: dict[str, Any]) -> dict[str, str]:
    masked = {"email": mask_email(str(subject.get("email", "")))}
    if subject.get("name"):
        masked["name"] = mask_name(str(subject["name"]))
    if subject.get("phone"):
        masked["phone"] = mask_phone(str(subject["phone"]))
    return masked
