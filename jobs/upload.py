"""Upload job: publish a trained pipeline with its model card as one commit to a Hub model repository."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ddpm.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class UploadConfig:
    pipeline: str = ""                 # runs/<name>/pipeline
    repo: str = ""                     # user/name or org/name
    private: bool = True
    dry_run: bool = False              # stage and list the files and the card; no network, no token needed
    message: str = ""                  # commit message; "" names the run


def run(cfg: UploadConfig) -> str:
    from ddpm.hub import stage

    if not cfg.repo or cfg.repo.count("/") != 1:
        raise UserError(f"--repo: {cfg.repo!r} is not of the form user/name")
    pipeline = Path(cfg.pipeline).resolve()
    with tempfile.TemporaryDirectory(prefix="ddpm-upload-") as tmp:
        files = stage(pipeline, cfg.repo, Path(tmp) / "stage")
        listing = "\n".join(f"  {f}" for f in files)
        if cfg.dry_run:
            print(f"dry run: would upload {len(files)} files from {pipeline} to {cfg.repo} ({'private' if cfg.private else 'public'}):\n{listing}")
            print("--- README.md ---\n" + (Path(tmp) / "stage" / "README.md").read_text())
            return ""
        from huggingface_hub import HfApi, get_token

        if not get_token():
            raise UserError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login` (the token is never printed)")
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        try:
            api.create_repo(cfg.repo, private=cfg.private, exist_ok=True)
            info = api.upload_folder(repo_id=cfg.repo, folder_path=Path(tmp) / "stage",
                                     commit_message=cfg.message or f"Upload {pipeline.parent.name} (ddpm)")
        except HfHubHTTPError as e:  # 401/403/404/...: the server's first line says which
            raise UserError(f"upload to {cfg.repo} failed: {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise UserError(f"upload to {cfg.repo} failed: {type(e).__name__}: {e}") from None
        print(f"uploaded {len(files)} files to {info.commit_url if hasattr(info, 'commit_url') else cfg.repo}")
        return cfg.repo
