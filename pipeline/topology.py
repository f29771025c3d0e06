"""Names of the actors and queues: the message topology both sides agree on.

The pipeline publishes by name, so it never imports `workers`; the workers declare
their actors with these same names.
"""

from __future__ import annotations

INTAKE_QUEUE = "privacy.intake"
INTAKE_ACTOR = "intake"

VERIFY_QUEUE = "privacy.verify"
VERIFY_ACTOR = "verify_request"

LOCATE_QUEUE = "privacy.locate"
LOCATE_ACTOR = "locate_request"

STORE_QUEUE = "privacy.stores"
LOCATE_STORE_ACTOR = "locate_store"
ACT_STORE_ACTOR = "act_on_store"
RECHECK_STORE_ACTOR = "recheck_store"

ACT_QUEUE = "privacy.act"
ACT_ACTOR = "act_on_request"
FINISH_ACTOR = "finish_request"

NOTIFY_QUEUE = "privacy.notify"
NOTIFY_ACTOR = "notify_outcome"
SEND_EMAIL_ACTOR = "send_email"

ALL_QUEUES = (INTAKE_QUEUE, VERIFY_QUEUE, LOCATE_QUEUE, STORE_QUEUE, ACT_QUEUE, NOTIFY_QUEUE)
