"""`jaxcond export`: a trained run as a diffusers-format folder other tools can load.

The folder holds each part (`unet/`, `text_encoder/`, `text_encoder_2/`, `vae/`) in both Flax `.msgpack`
and PyTorch `.safetensors` layouts (written by the model family), the tokenizer, a DDIM
scheduler config matching jaxcond's sampler, and `jaxcond.json`, which records what the
unconditional branch must be at inference to match training: the null of every
conditioner, and the learned null tensors themselves in `nulls.safetensors`. Optionally
also one `.safetensors` in the original Stable Diffusion layout (ComfyUI, AUTOMATIC1111).
The folder may be on Cloud Storage (gs://BUCKET/path): see `export`.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile

import jax

from jaxcond import dropout, flow, outputs, rundir, storage
from jaxcond.checks import ConfigError
from jaxcond.models import convert
from jaxcond.models.family import DIFFUSERS_VERSION
from jaxcond.outputs import make_output_dir

MANIFEST = "jaxcond.json"
# On Cloud Storage: an object present while an export uploads, so that a rerun after a kill
# knows the folder (which then has no MANIFEST) for its own and replaces it.
UPLOADING = ".jaxcond-upload-incomplete"


def scheduler_config(cfg_diffusion: dict, clip_sample: bool) -> dict:
    """diffusers scheduler settings that sample the way jaxcond's sampler does: DDIM, or
    for a flow-matching model FlowMatchEulerDiscreteScheduler (jaxcond.flow.schedule)."""
    d = cfg_diffusion
    if d.get("objective", "ddpm") == "flow":
        out = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
               "num_train_timesteps": flow.NUM_TRAIN_TIMESTEPS, "shift": d["flow_shift"]}
        if d.get("flow_shift_mode", "fixed") == "resolution":  # Flux's
            out.update(use_dynamic_shifting=True, time_shift_type="exponential", base_shift=d["flow_base_shift"],
                       max_shift=d["flow_max_shift"], base_image_seq_len=flow.BASE_SEQ_LEN,
                       max_image_seq_len=flow.MAX_SEQ_LEN)
        return out
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": d["num_train_timesteps"], "beta_schedule": d["beta_schedule"],
            "beta_start": d["beta_start"], "beta_end": d["beta_end"],
            "prediction_type": d["prediction_type"], "timestep_spacing": "trailing",
            # jaxcond's last step goes to alpha_bar 1 (the clean sample). "trailing" spacing
            # ignores steps_offset; 1 keeps diffusers' pipelines from warning it is outdated.
            "set_alpha_to_one": True, "steps_offset": 1, "clip_sample": clip_sample,
            "clip_sample_range": 1.0}


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def export(workdir: str, out: str, weights: str = "ema", step: int | None = None,
           single_file: bool = False, model_source: str | None = None, lora: str | None = None,
           merge: bool = False) -> dict:
    """Writes run `workdir`'s checkpoint (newest, or `step`) to `out`; returns the manifest.
    `single_file` adds `<out>/<name of out>.safetensors` in the original SD layout;
    `model_source` is where the run's base model is now, if it moved since training.
    A LoRA run exports its adapters (`lora`: "diffusers" writes `<out>/LORA_FILE`,
    "kohya" `<out>/<name of out>.safetensors`) or, with `merge`, the full model with them
    merged.

    A local `out` is written aside and swapped in whole. A gs:// `out` is written in a
    local temporary folder (under TMPDIR: room for the whole export), then the earlier
    objects under `out` are deleted and the new ones uploaded one by one: first the marker
    UPLOADING, MANIFEST (and model_index.json) last, then the marker is removed. A kill
    mid-upload leaves a folder without MANIFEST, which nothing takes for a complete export,
    and with the marker, so a rerun replaces it. Either way a non-empty `out` that holds
    neither MANIFEST nor that marker is refused: it is not jaxcond's to replace."""
    remote = storage.is_url(out)
    if remote:
        out = storage.absolute(out)
        _check_bucket_folder(out)  # a bad URL is one line, before the run is loaded
    elif os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MANIFEST)):
        raise ConfigError(f"--out {out!r} is a non-empty folder that is not an earlier export; "
                          "choose a new or empty folder")
    t = rundir.load_trained(workdir, step, model_source)
    params = jax.device_get(t.params(weights))
    trained_lora = getattr(t.family, "lora", None) is not None
    if (lora or merge) and not trained_lora:
        raise ConfigError(f"--{'lora' if lora else 'merge'}: run {workdir!r} trained no LoRA adapters "
                          "(config.model.lora.rank = 0); export it without the flag")
    if trained_lora and not (lora or merge):
        raise ConfigError(f"run {workdir!r} trained LoRA adapters: export them with --lora (add --lora_format "
                          "kohya for ComfyUI/AUTOMATIC1111), or the base model with them merged with --merge")
    if lora and (merge or single_file):
        raise ConfigError("--lora writes the adapters alone: leave out --merge and --single_file (or export twice)")
    refusal = t.family.single_file_refusal() if single_file else None
    if refusal:
        raise ConfigError(f"--single_file: {refusal}")
    out = out if remote else os.path.normpath(out)
    file_name = (posixpath.basename(out) if remote else os.path.basename(out)) + ".safetensors"
    name = file_name if single_file else None
    if lora:
        name = LORA_FILE if lora == "diffusers" else file_name
    if remote:
        with tempfile.TemporaryDirectory(prefix="jaxcond-export-") as tmp:
            os.makedirs(os.path.join(tmp, "export"))
            manifest = _write(t, params, os.path.join(tmp, "export"), name, weights, workdir, lora)
            _upload(os.path.join(tmp, "export"), out, os.path.join(tmp, UPLOADING))
        return manifest
    make_output_dir(out, "--out")  # after the checks above, so a refused export leaves no folder
    # Written aside and swapped in whole: a kill mid-export leaves the earlier export (or
    # none) and a temporary folder the next export removes, never a half-written model.
    outputs.remove_stale(out)
    with outputs.atomic(out) as tmp:
        os.makedirs(tmp)
        manifest = _write(t, params, tmp, name, weights, workdir, lora)
        previous = f"{tmp}-previous"
        os.rename(out, previous)  # made above: empty, or an earlier export
    shutil.rmtree(previous, ignore_errors=True)
    return manifest


def _check_bucket_folder(out: str) -> None:
    """A ConfigError unless gs:// URL `out` is a writable folder in a bucket that is empty,
    an earlier export or an upload of one cut short."""
    storage.check_url(out, "--out")
    if "/" not in out[len("gs://"):]:  # replacing an export deletes its folder: never a whole bucket
        raise ConfigError(f"--out {out!r}: name a folder in the bucket, e.g. {out}/export")
    storage.check_writable(out, "--out")
    names = storage.listdir(out)
    if names and MANIFEST not in names and UPLOADING not in names:
        raise ConfigError(f"--out {out!r} holds objects but is not an earlier export (no {MANIFEST}); "
                          f"choose a new or empty folder, or delete it first (gcloud storage rm -r {out})")


def _upload(local: str, url: str, marker: str) -> None:
    """Replaces folder `url` by the files of folder `local`, object by object, the marker
    first and the files that say a folder is complete last (see `export`)."""
    files = sorted(os.path.relpath(os.path.join(d, n), local).replace(os.sep, "/")
                   for d, _, names in os.walk(local) for n in names)
    last = [f for f in ("model_index.json", MANIFEST) if f in files]  # diffusers' entry, then jaxcond's
    with open(marker, "w") as f:
        f.write("a jaxcond export is being uploaded here; without jaxcond.json it is incomplete\n")
    storage.remove(url)  # the earlier export whole: none of its objects may outlive it
    storage.upload(marker, storage.join(url, UPLOADING))
    for f in [f for f in files if f not in last] + last:
        storage.upload(os.path.join(local, f), storage.join(url, f))
    storage.remove(storage.join(url, UPLOADING))


def _write(t: rundir.Trained, params: dict, out: str, name: str | None, weights: str, workdir: str,
           lora: str | None) -> dict:
    """The export's files in folder `out` (`name`: the single or LoRA file's, or None);
    returns the manifest."""
    if lora:
        t.family.save_lora(os.path.join(out, name), params["model"], lora)
    else:
        t.family.save(out, params["model"])
        if name:
            t.family.save_single_file(os.path.join(out, name), params["model"])
    # The unconditional branch replaces the caption's conditioners; data-supplied ones at
    # rate 0 (SDXL's size conditioning) keep their real values.
    dropped = {m for g in dropout.unconditional_groups(t.spec.groups, t.family.batch_conditioners)
               for m in g.members}
    nulls = {c: kind for c, kind in t.spec.nulls if c in dropped}
    learned = {c: v for c, v in params["nulls"].items() if c in nulls}
    if learned:
        convert.write_safetensors(os.path.join(out, "nulls.safetensors"), learned)
    text_nulls = [nulls[c] for c in nulls if c not in t.family.batch_conditioners]
    manifest = {
        "exported_from": storage.absolute(workdir), "step": t.step, "weights": weights,
        "conditioners": {k: list(v) for k, v in t.family.conditioners.items()},
        "dropout_groups": {g.name: {"members": list(g.members), "rate": g.rate, "schedule": g.schedule}
                           for g in t.spec.groups},
        # How the unconditional (negative) branch must be built to match training:
        # empty = encode "", zeros = zero tensors, learned = the tensors in nulls.safetensors;
        # conditioners not listed keep their conditional values there.
        "nulls": nulls,
        "kept_in_unconditional": sorted(set(t.family.conditioners) - set(nulls)),
        "learned_nulls_file": "nulls.safetensors" if learned else None,
        # diffusers' SDXL pipelines zero the unconditional embeddings when this is set.
        "force_zeros_for_empty_prompt": bool(text_nulls) and all(k == "zeros" for k in text_nulls),
        **t.family.export_manifest(),
        "single_file": None if lora else name,
        # What the network predicts: a flow model its velocity (noise - x0).
        "prediction_type": "flow" if t.spec.flow is not None else t.cfg.diffusion.prediction_type,
    }
    if lora:
        m = t.cfg.model
        manifest["lora"] = {"file": name, "format": lora, "base": m.source, "rank": m.lora.rank,
                            "alpha": m.lora.alpha or m.lora.rank, "targets": list(m.lora.targets)}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    if lora:  # the adapters alone: the base model's own folder has its scheduler and index
        return manifest
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config(t.cfg.diffusion.to_dict(), clip_sample=not t.family.latent), f, indent=2)
    index = t.family.pipeline_index(manifest["force_zeros_for_empty_prompt"])
    if index is not None:
        with open(os.path.join(out, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return manifest
