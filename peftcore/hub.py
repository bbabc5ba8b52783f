"""``push_to_hub`` for ``PeftModel`` and configs, through huggingface_hub's public commit API.

What transformers' ``PushToHubMixin`` (which PEFT's classes inherit) does, and so what this does:
create the repo if needed (``exist_ok``; ``private`` applies only to a new repo), create the branch
``revision`` if it is not a PR ref, save into a temporary folder, then upload every file of it in
one commit (``HfApi.create_commit``): the repo never holds half a save. Unlike the mixin, the
README already in the repo is fetched into the temporary folder first, so ``save_pretrained``
updates the user's model card instead of replacing it; a config's push uploads ``adapter_config.json``
alone (the mixin would also upload a README it creates or re-saves).

Loading needs nothing here: ``from_pretrained("<repo id>", revision=...)`` resolves files through
``huggingface_hub.hf_hub_download`` and its cache (``peftcore.files.resolve_file``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from peftcore.files import README_NAME


def _fetch_readme(api, repo_id: str, folder: str, revision: str | None) -> None:
    """Copy the repo's README.md (if any) into ``folder``; a missing file, branch or repo is no error."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id, README_NAME, revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
        return
    with open(path, encoding="utf-8") as src, open(os.path.join(folder, README_NAME), "w", encoding="utf-8") as dst:
        dst.write(src.read())


def add_card_tags(folder: str, tags: list[str] | None) -> None:
    """``push_to_hub(tags=[...])``: the tags join those of the saved model card."""
    if not tags:
        return
    from huggingface_hub import ModelCard

    from peftcore.adapter_folder import write_text

    card = ModelCard.load(os.path.join(folder, README_NAME))
    card.data.tags = sorted(set(card.data.tags or []) | set(tags))
    write_text(folder, README_NAME, card.content)


def folder_operations(folder: str) -> list:
    """One ``CommitOperationAdd`` per file under ``folder`` (sub-folders: the other adapters), sorted."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            in_repo = os.path.relpath(path, folder).replace(os.sep, "/")
            operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))
    return sorted(operations, key=lambda op: op.path_in_repo)


def push_folder_to_hub(
    save: Callable[[str], None],
    repo_id: str,
    *,
    default_message: str,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    keep_readme: bool = True,
):
    """Save with ``save(folder)`` into a temporary folder and upload it as one commit; returns the ``CommitInfo``."""
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"push_to_hub: repo_id must be a non-empty string like 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        if keep_readme:
            _fetch_readme(api, repo_id, folder, revision)
        save(folder)
        operations = folder_operations(folder)
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message if commit_message is not None else default_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
