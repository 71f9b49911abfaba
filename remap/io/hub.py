"""A hub repo id (`org/name`) as a local snapshot folder: from the cache, or downloaded.

huggingface_hub is imported only here, when a source is no local path.
"""

from __future__ import annotations

from pathlib import Path

from remap.errors import RemapError, flattened


def download(repo_id: str, revision: str | None, patterns: list[str]) -> tuple[Path, str]:
    """The snapshot folder and commit of a hub repo: from the cache, or downloaded.
    huggingface_hub honours HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN itself."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        # root-level files only: repos may keep other formats in subfolders ("original/")
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=["*/*"])
    except LocalEntryNotFoundError as e:
        raise RemapError(
            f"no such local path; as a hub repo it is not in the local cache and the hub cannot be reached: {flattened(e)}",
            file=repo_id,
            expected="network access, or a cached snapshot (HF_HOME / HF_HUB_CACHE)",
        ) from e
    except (HfHubHTTPError, HFValidationError) as e:
        raise RemapError(f"no such local path; as a hub repo: {flattened(e)}", file=repo_id) from e
    # snapshot folders are named by their commit hash
    return Path(folder), Path(folder).name
