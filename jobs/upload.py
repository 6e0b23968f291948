"""Upload job: publish a trained pipeline with its model card as one commit to a Hub model repository.

    ddpm upload --pipeline runs/<name>/pipeline --repo-id <user>/<model> [--private] [--revision BRANCH] [--dry-run]

The folder is loaded first (a broken export is refused), the commit holds the whole pipeline or nothing,
and a rerun with nothing changed makes no commit (the Hub compares each file's hash before uploading).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ddpm.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class UploadConfig:
    pipeline: str = ""  # runs/<name>/pipeline
    repo_id: str = field(default="", metadata={"aliases": ["--repo"]})  # Hub model repository: user/name or org/name
    private: bool = False  # visibility when the repo is created (an existing repo keeps its own)
    revision: str = ""  # branch to commit to; "" is main; created from main when missing
    license: str = "mit"  # the card's license field
    dry_run: bool = False  # stage and list the files and the card; no network, no token needed
    message: str = ""  # commit message; "" names the run


CONFIG = UploadConfig


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _http_client_errors() -> tuple[type[Exception], ...]:
    """Connection failures of the HTTP client huggingface_hub uses (httpx, or httpx2 from huggingface_hub 2.x on);
    requests' errors are OSErrors already."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except ImportError:
            pass
    return tuple(found)


def run(cfg: UploadConfig) -> str:
    """Returns the commit id on the Hub ("" for a dry run)."""
    from ddpm.publishing.hub import check_pipeline, stage

    if not cfg.repo_id or cfg.repo_id.count("/") != 1 or not all(cfg.repo_id.split("/")):
        raise UserError(f"--repo-id: {cfg.repo_id!r} is not of the form user/name")
    pipeline = Path(cfg.pipeline).resolve()
    pipeline_class = check_pipeline(pipeline)
    with tempfile.TemporaryDirectory(prefix="ddpm-upload-") as tmp:
        staged = Path(tmp) / "stage"
        files = stage(pipeline, cfg.repo_id, staged, cfg.license)
        total = sum((staged / f).stat().st_size for f in files)
        revision = cfg.revision or "main"
        listing = "\n".join(f"  {f}  ({_size((staged / f).stat().st_size)})" for f in files)
        header = (
            f"{cfg.repo_id}@{revision} ({'private' if cfg.private else 'public'} if created): {len(files)} files, "
            f"{_size(total)}, {pipeline_class} from {pipeline}"
        )
        if cfg.dry_run:
            print(f"dry run, nothing sent: would upload to {header}\n{listing}")
            print("--- README.md ---\n" + (staged / "README.md").read_text())
            return ""
        from huggingface_hub import HfApi, get_token

        if not get_token():
            raise UserError(
                "no Hugging Face token: set HF_TOKEN, or run `hf auth login` once (the token is never printed)"
            )
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        print(f"uploading to {header}", flush=True)
        try:
            api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
            if cfg.revision:
                api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True)
            before = api.repo_info(cfg.repo_id, revision=revision).sha
            info = api.upload_folder(
                repo_id=cfg.repo_id,
                folder_path=staged,
                revision=revision,
                commit_message=cfg.message or f"Upload {pipeline.parent.name} (ddpm)",
            )
        except HfHubHTTPError as e:  # 401/403/404/...: the server's first line says which
            status = e.response.status_code if e.response is not None else None
            hint = (
                f" (the token was refused: it needs write access to {cfg.repo_id.split('/')[0]}'s repositories)"
                if status in (401, 403)
                else ""
            )
            raise UserError(f"upload to {cfg.repo_id} failed: {str(e).splitlines()[0]}{hint}") from None
        except (OSError, *_http_client_errors()) as e:
            raise UserError(
                f"upload to {cfg.repo_id} failed: {type(e).__name__}: {e}; "
                "a commit lands whole or not at all: rerun to finish"
            ) from None
        if info.oid == before:
            print(
                f"nothing changed: {cfg.repo_id}@{revision} already holds these files (commit {before[:10]}); "
                "no commit made"
            )
        else:
            print(f"committed {info.oid[:10]}: {info.commit_url}")
        return info.oid
