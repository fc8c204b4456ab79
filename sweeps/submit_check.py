"""Clear messages for a `ray job submit` that cannot reach its cluster or lacks its token.

Ray's job CLI calls the function named by $RAY_JOB_SUBMIT_HOOK with the submission's
arguments before it uploads anything; the README's recipe sets it to
`sweeps.submit_check.check`. Without it, the same mistakes end in Ray's tracebacks.
"""

from __future__ import annotations

import os
import sys

from odenet import envvars

AUTH_MODE, AUTH_TOKEN = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"


def check(address: str | None = None, **_submission) -> None:
    """Connect as `ray job submit` will; exit 2 with the fix when the cluster cannot be
    reached or refuses the request for want of a token."""
    problem = connection_problem(address)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def connection_problem(address: str | None) -> str | None:
    """Why `ray job submit --address ADDRESS` cannot talk to its cluster, with the fix; None if it can."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    given = address or os.environ.get(envvars.RAY_API_SERVER_ADDRESS) or os.environ.get(envvars.RAY_ADDRESS)
    shown = f"at {given}" if given else "on this machine (no --address, RAY_API_SERVER_ADDRESS or RAY_ADDRESS given)"
    try:
        JobSubmissionClient(address)
    except ConnectionError:
        return (f"cannot reach a Ray cluster {shown}: start one with `ray start --head` (its dashboard, "
                f"which takes jobs, listens on http://127.0.0.1:8265), or pass the address of a running "
                f"cluster's dashboard with --address")
    except (AuthenticationError, requests.HTTPError, RuntimeError) as exc:
        if not _is_auth_failure(exc):
            raise
        return (f"the Ray cluster {shown} asks for its authentication token and none was sent: "
                f"`export {AUTH_MODE}=token` (the token is read from ~/.ray/auth_token, which `ray start` "
                f"uses, or from {AUTH_TOKEN})")
    return None


def _is_auth_failure(exc: Exception) -> bool:
    import requests
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError):
        return True
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code in (401, 403)
    text = str(exc)
    return "401" in text or "403" in text or "Unauthorized" in text or "auth" in text.lower()
