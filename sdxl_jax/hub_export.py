"""An export as a Hugging Face model repo: export's --push-to-hub and --model-card.

    python -m sdxl_jax.export --workdir runs/nai3 --format single-file --push-to-hub me/nai3 \
        [--private] [--revision BRANCH] [--commit-message M] [--license ID] [--out nai3.safetensors]
    python -m sdxl_jax.export --workdir runs/nai3 --format single-file --push-to-hub me/nai3 \
        --model-card card.md                  # writes the card that push would upload; no push
    python -m sdxl_jax.export --workdir runs/nai3 --format single-file --push-to-hub me/nai3 \
        --card card.md                        # pushes with card.md (reviewed, edited) as the card

--model-card FILE writes the card alone (no export, no upload; the repo of --push-to-hub names
the files in it, OWNER/NAME without it). --card FILE uploads FILE instead of the generated card.
The repo's layout: the diffusers folder at its root, or the single file / kohya LoRA as
NAME.safetensors, or the PEFT LoRA as pytorch_lora_weights.safetensors (the name diffusers'
load_lora_weights looks for); README.md (the card) and images/preview.png (the run's newest
preview grid at or before the exported step). They are staged in a temporary folder beside
--out (or in the workdir), pushed as one commit, and the staging folder is removed.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from sdxl_jax import model_card, publish


def add_flags(p) -> None:
    """export's flags for the Hub and the card."""
    publish.add_hub_flags(p)
    p.add_argument("--license", default=None,
                   help="the card's license (a Hub license id, e.g. openrail++); default: the "
                        "base model's when known")
    p.add_argument("--model-card", default="", metavar="FILE",
                   help="write the model card to FILE and stop: no export, no upload (to review "
                        "or edit it; the repo of --push-to-hub is named in it)")
    p.add_argument("--card", default="", metavar="FILE",
                   help="with --push-to-hub: upload FILE (a card written by --model-card, "
                        "edited) instead of the generated card")


def wanted(args) -> bool:
    return bool(args.push_to_hub or args.model_card or args.card)


def check_args(args) -> None:
    """What can fail before the export: the flags, the repo id, the card file, the token."""
    if args.push_to_hub:
        publish.check_repo_id(args.push_to_hub)
    if args.model_card:
        if args.card:
            raise ValueError("--model-card FILE writes the card and stops; --card FILE uploads "
                             "one: give one of them")
        if args.out:
            raise ValueError("--model-card FILE writes the card alone, no export: leave --out "
                             "out (export with --out in a command of its own)")
        if os.path.exists(args.model_card) and not args.overwrite:
            raise FileExistsError(f"{args.model_card} already exists; pass --overwrite to "
                                  "replace it, or choose another --model-card")
        return
    if not args.push_to_hub:
        raise ValueError("--card FILE is the card to upload: it needs --push-to-hub OWNER/NAME")
    if args.card and not os.path.isfile(args.card):
        raise FileNotFoundError(f"--card {args.card}: no such file; write one with --model-card "
                                f"{args.card} (same flags), or leave --card out to upload the "
                                "generated card")
    publish.check_access(args.push_to_hub)


def _license(args, config: dict) -> str | None:
    """The card's license; ValueError asking for --license only when a card is generated."""
    if args.card:
        return None  # the given card states its own
    return model_card.resolve_license(config, args.license)


def card_text(args, run, which: str, repo_id: str) -> tuple[str, model_card.RunFacts]:
    facts = model_card.run_facts(run, which)
    preview = model_card.PREVIEW_IN_REPO if facts.preview else None
    text = model_card.render_card(facts, args.format, repo_id,
                                  model_card.published_files(args.format, repo_id),
                                  _license(args, run.config), args.dtype, preview)
    return text, facts


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no second copy of GBs of weights), a copy across filesystems."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _weights_path(fmt: str, repo_id: str) -> str:
    """The export's place in the repo: "" (the root) for the diffusers folder, else its file."""
    if fmt == "diffusers":
        return ""
    return next(iter(model_card.published_files(fmt, repo_id)))


def stage(args, run, which: str, write, staging: str) -> str:
    """The repo folder under `staging`: the export (`write(out)`), README.md, the preview."""
    repo_id = args.push_to_hub
    repo = os.path.join(staging, "repo")
    target = _weights_path(args.format, repo_id)
    if args.out:  # the export where the user asked, linked into the repo folder
        write(args.out)
        if target:
            _link_or_copy(args.out, os.path.join(repo, target))
        else:
            shutil.copytree(args.out, repo, copy_function=_link_or_copy)
    elif target:
        os.makedirs(repo)
        write(os.path.join(repo, target))
    else:
        write(repo)
    if args.card:
        shutil.copyfile(args.card, os.path.join(repo, "README.md"))
        facts = model_card.run_facts(run, which)
    else:
        text, facts = card_text(args, run, which, repo_id)
        with open(os.path.join(repo, "README.md"), "w", encoding="utf-8") as f:
            f.write(text)
    if facts.preview:
        _link_or_copy(facts.preview, os.path.join(repo, model_card.PREVIEW_IN_REPO))
    return repo


def run(args, run, which: str, write) -> str:
    """--model-card alone: write the card; --push-to-hub: stage, push, clean up. Returns the
    line to print."""
    if args.model_card:
        text, _ = card_text(args, run, which, args.push_to_hub or "OWNER/NAME")
        with open(args.model_card, "w", encoding="utf-8") as f:
            f.write(text)
        return f"wrote the model card of step {run.step} of {args.workdir} to {args.model_card}"
    _license(args, run.config)  # asks for --license before the export, not after
    parent = os.path.dirname(os.path.abspath(args.out)) if args.out else args.workdir
    staging = tempfile.mkdtemp(prefix=".hub-staging-", dir=parent)
    try:
        repo = stage(args, run, which, write, staging)
        message = args.commit_message or (f"sdxl_jax export: {args.format}, step {run.step} "
                                          f"({which} weights)")
        url = publish.push(repo, args.push_to_hub, args.private, args.revision, message)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return (f"pushed step {run.step} ({which} weights) of {args.workdir} as {args.format} to "
            f"{args.push_to_hub}: {url}")
