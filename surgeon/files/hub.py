"""Upload a converted checkpoint directory to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from surgeon.errors import SurgeonError


class HubError(SurgeonError):
    """The hub refused or could not be reached; the local checkpoint is kept."""


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False,
                message: str = "Upload a checkpoint converted by surgeon") -> str:
    """Create `repo_id` if needed (a model repo) and upload `folder` to it as one commit;
    returns the commit URL. Uses the token of `hf auth login` or `HF_TOKEN`."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                   commit_message=message)
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise HubError(f"cannot push to hub repo {repo_id}: {reason}; the converted "
                       f"checkpoint is complete in {folder}") from e
    return str(getattr(commit, "commit_url", commit))
