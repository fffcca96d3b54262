"""The adapter folder's model card: README.md with YAML front matter (Hugging Face Hub convention) + prose."""
from __future__ import annotations

import json
from typing import Any

import yaml


def front_matter(kind: str, source_id: str, base_model: str, license: str, placeholder: str | None) -> dict[str, Any]:
    """The Hub metadata block: base_model, library_name, license, tags (kind, source:<id>), trigger word."""
    from .kinds import get_kind

    tags = ["prompt_cdm", "compartmentalized-diffusion", "text-to-image", "stable-diffusion", "diffusers", kind,
            get_kind(kind).hub_tag, f"source:{source_id}"]
    meta: dict[str, Any] = {"base_model": base_model, "library_name": "prompt_cdm", "license": license,
                            "pipeline_tag": "text-to-image", "tags": tags}
    if placeholder:
        meta["instance_prompt"] = placeholder  # the Hub's field for a trigger word
    return meta


def _table(figures: dict[str, Any]) -> str:
    rows = ["| figure | value |", "| --- | --- |"]
    for k, v in figures.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        rows.append(f"| {str(k).replace('|', '/')} | {str(v).replace('|', '/')} |")
    return "\n".join(rows)


def render(config, figures: dict[str, Any] | None, license: str, samples_file: str | None, folder_name: str) -> str:
    """README.md text for an AdapterConfig (`config`); `figures` (e.g. steps, loss, minutes) become a table."""
    from .kinds import get_kind

    kind = get_kind(config.kind)
    placeholder = kind.trigger(config.params)
    meta = front_matter(config.kind, config.source_id, config.base_model, license, placeholder)
    head = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"
    what = kind.title
    use = kind.card_usage(config.params, "a red star", folder_name)
    ours_prompt, diffusers_load, diffusers_prompt, detail = (use[k] for k in (
        "ours_prompt", "diffusers_load", "diffusers_prompt", "detail"))
    parts = [
        head,
        f"# prompt_cdm {what} for source `{config.source_id}`\n",
        f"A compartmentalized-diffusion adapter (CDM, arXiv 2308.01937): trained only on the data of source "
        f"`{config.source_id}` on the frozen backbone `{config.base_model}` (fingerprint "
        f"`{config.backbone_fingerprint}`). Its {what}: {detail} Deleting this folder forgets the source.\n",
        "## Use\n",
        "With prompt_cdm (the backbone fingerprint is checked):\n",
        "```python\nfrom prompt_cdm.adapters import load_adapter\nfrom prompt_cdm.backbone import load\n"
        "from prompt_cdm.compose.pipeline import text_to_image\n\n"
        f'pipe = load("{config.base_model}")\nhandle = load_adapter("{folder_name}", pipe)\n'
        f"prompt = {ours_prompt}\nimages = text_to_image(pipe, [prompt])\n```\n",
        "With plain diffusers:\n",
        f"```python\n{diffusers_load}\nimage = pipe({diffusers_prompt}).images[0]\n```\n",
        "## Training\n",
        f"Data manifest hash: `{config.data_hash or 'n/a'}`; prompt_cdm {config.library_version}.\n",
    ]
    if figures:
        parts.append(_table(figures) + "\n")
    if config.train_config:
        parts.append("<details><summary>training config</summary>\n\n```json\n"
                     + json.dumps(config.train_config, indent=2, sort_keys=True) + "\n```\n\n</details>\n")
    if samples_file:
        parts.append(f"## Samples\n\n![samples]({samples_file})\n")
    parts.append("## Files\n\n- `adapter_config.json`: kind, hyper-parameters, source, backbone fingerprint, "
                 "data hash, training config\n- `adapter_model.safetensors`: the weights (prompt_cdm keys)\n"
                 + (f"- `{kind.diffusers_file}`: {kind.diffusers_note}\n" if kind.diffusers_file != "adapter_model.safetensors"
                    else f"  ({kind.diffusers_note})\n"))
    return "\n".join(parts)


def read_front_matter(text: str) -> dict[str, Any]:
    """Parse the YAML block between the leading '---' lines of a model card."""
    if not text.startswith("---\n"):
        raise ValueError("model card has no YAML front matter (it must start with '---')")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])
