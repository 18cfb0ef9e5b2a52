"""A finished staging folder (an export plus its model card) to the Hugging Face Hub, as one commit.

    python -m sdxl_jax.publish FOLDER --repo OWNER/NAME [--private] [--revision BRANCH] \
        [--commit-message M]

`python -m sdxl_jax.export --push-to-hub` stages the export and its card, then calls `push`; this
CLI pushes a folder prepared (and perhaps edited) by hand. Only stable `huggingface_hub` calls are
used (whoami, create_repo, create_branch, repo_info, create_commit with CommitOperationAdd): the
library uploads large files its own way (LFS or Xet, resumable) before the commit, and nothing is
visible in the repo until that one commit lands, so a failed push leaves no half-uploaded model.

The token is the library's: HF_TOKEN, else the login of `hf auth login`. HF_ENDPOINT names another
Hub. Every way a push can fail before or during the upload is one line saying what to do:
unreachable Hub, offline mode, no token, a rejected (401) or read-only (403) token, a namespace the
token cannot write to, a public repo where --private was asked for.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from sdxl_jax import cli

log = logging.getLogger("sdxl_jax.publish")

TOKENS_URL = "https://huggingface.co/settings/tokens"
LOGIN = f"set HF_TOKEN to a token with write access ({TOKENS_URL}) or run `hf auth login`"


class PublishError(Exception):
    """A push that cannot go ahead, in one line saying what to do (a user error for cli)."""


def staged_files(folder: str) -> dict[str, str]:
    """{path in the repo: local path} of every file under `folder` (POSIX paths, sorted)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such staging folder to push")
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            local = os.path.join(root, name)
            out[os.path.relpath(local, folder).replace(os.sep, "/")] = local
    if "README.md" not in out:
        raise FileNotFoundError(f"{folder} has no README.md: a pushed model needs its card "
                                "(python -m sdxl_jax.export … --model-card FOLDER/README.md)")
    return dict(sorted(out.items()))


def _endpoint() -> str:
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _unreachable(exc: BaseException) -> bool:
    """A connection that never got an HTTP answer (refused, DNS, timeout), in requests' or
    httpx's clothing (huggingface_hub 0.x uses the first, 1.x and later the second)."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in (
                "ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "gaierror"):
            return True
        e = e.__cause__ or e.__context__
    return False


def _server_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    try:
        return str(response.json().get("error", ""))[:200]
    except Exception:  # not JSON: the status code says enough
        return ""


def explain(exc: BaseException, repo_id: str, endpoint: str, user: str = "") -> PublishError | None:
    """The one-line PublishError for a failure of a Hub call, or None (then it is a bug)."""
    if _unreachable(exc):
        return PublishError(f"cannot reach the Hugging Face Hub at {endpoint} (connection failed: "
                            f"{_root_cause(exc)}); check the network or HF_ENDPOINT and run the "
                            "same command again; nothing was uploaded")
    status = _status(exc)
    said = _server_message(exc)
    said = f": {said}" if said else ""
    if status == 401:
        return PublishError(f"the Hub at {endpoint} rejected the token (401 Unauthorized{said}): "
                            f"it is missing, invalid or expired; {LOGIN}")
    if status == 403:
        who = f"the token of {user}" if user else "the token"
        return PublishError(f"{who} may not write to {repo_id} (403 Forbidden{said}): a read-only "
                            f"token, or a namespace it has no write access to; {LOGIN}, or push to "
                            "a repo of your own")
    if status is not None:
        return PublishError(f"the Hub at {endpoint} answered {status} while pushing {repo_id}"
                            f"{said}; nothing was committed: run the same command again")
    return None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return cli.one_line(str(exc))[:160] or type(exc).__name__


def check_repo_id(repo_id: str) -> tuple[str, str]:
    """(owner, name) of "OWNER/NAME", or ValueError."""
    owner, sep, name = repo_id.partition("/")
    if not sep or not owner or not name or "/" in name:
        raise ValueError(f"--push-to-hub {repo_id!r}: give the repo as OWNER/NAME (your user or "
                         "organisation name, a slash, the model's name)")
    return owner, name


def _writer(api, repo_id: str, endpoint: str) -> str:
    """The token's user name, after checking it may write to the repo's namespace."""
    from huggingface_hub.utils import get_token

    if not (api.token or get_token()):
        raise PublishError(f"no Hugging Face token to push {repo_id} with: {LOGIN}")
    try:
        me = api.whoami()
    except Exception as e:
        err = explain(e, repo_id, endpoint)
        if err is None:
            raise
        raise err from None
    user = me.get("name", "")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role", "")
    if role == "read":
        raise PublishError(f"the token of {user} is read-only: pushing {repo_id} needs a token "
                           f"with write access ({TOKENS_URL}); set HF_TOKEN to it or run "
                           "`hf auth login`")
    owner = repo_id.split("/")[0]
    orgs = [o.get("name") for o in me.get("orgs") or []]
    if owner != user and owner not in orgs:
        member = f" nor one of its organisations {orgs}" if orgs else ""
        raise PublishError(f"{repo_id} belongs to {owner}, which is not {user} (the token's "
                           f"user){member}: push to {user}/{repo_id.split('/')[1]}, or use a "
                           f"token of {owner}")
    return user


def _api(token: str | None = None):
    from huggingface_hub import HfApi

    if _offline():
        raise PublishError("HF_HUB_OFFLINE is set: the Hub cannot be reached in offline mode; run "
                           "the same command with HF_HUB_OFFLINE=0")
    for name in ("httpx", "httpx2", "httpcore"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    return HfApi(endpoint=_endpoint(), token=token)


def check_access(repo_id: str, token: str | None = None) -> str:
    """The token's user name once it is known to be able to write to `repo_id`'s namespace (a
    check before minutes of export; the Hub has the last word at the push). PublishError."""
    check_repo_id(repo_id)
    return _writer(_api(token), repo_id, _endpoint())


def push(folder: str, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> str:
    """Upload every file of `folder` to the model repo `repo_id` in one commit (the repo, and the
    branch `revision`, created when missing); returns the commit's URL. `private` makes a new
    repo private and refuses an existing public one. PublishError: one line, what to do."""
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)
    files = staged_files(folder)
    endpoint = _endpoint()
    api = _api(token)
    user = _writer(api, repo_id, endpoint)
    message = commit_message or f"Upload {os.path.basename(os.path.abspath(folder))} with sdxl_jax"
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise PublishError(f"{repo_id} exists and is public; --private does not change an "
                               "existing repo: make it private in its settings on the Hub, or "
                               "push to a new repo")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=local)
               for path, local in files.items()]
        log.info("pushing %d files (%.1f MB) to %s%s", len(ops),
                 sum(os.path.getsize(p) for p in files.values()) / 1e6, repo_id,
                 f" @ {revision}" if revision else "")
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    except PublishError:
        raise
    except Exception as e:
        err = explain(e, repo_id, endpoint, user)
        if err is None:
            raise
        raise err from None
    return info.commit_url


def _parse(argv):
    p = cli.ArgumentParser(prog="python -m sdxl_jax.publish", description=__doc__.split("\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the staging folder: the export and its README.md (model card)")
    add_hub_flags(p, "--repo", required=True)
    return p.parse_args(argv)


def add_hub_flags(p, repo_flag: str = "--push-to-hub", required: bool = False) -> None:
    """The push flags, shared by this CLI and export's."""
    p.add_argument(repo_flag, metavar="OWNER/NAME", required=required,
                   default=None, help="Hugging Face model repo to push to (created when missing)")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing public repo is refused)")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main "
                   "when missing; default main)")
    p.add_argument("--commit-message", default=None, help="message of the one commit")


@cli.entry_point
def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    url = push(args.folder, args.repo, args.private, args.revision, args.commit_message)
    print(f"pushed {args.folder} to {args.repo}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
