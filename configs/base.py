"""The schema every config builds on: every field jaxcond reads, its default and what it accepts.

Not a runnable config by itself: it names no data (data.path is empty) and no weights
(model.source is empty). A config file builds on it and sets only what differs:

    import os

    from jaxcond.config import from_file

    def get_config():
        c = from_file(os.path.join(os.path.dirname(__file__), "base.py"))
        c.model.source = "stable-diffusion-v1-5/stable-diffusion-v1-5"
        c.data.path = "/data/images"
        return c

(configs/demo.py and configs/sd15.py do this; sd21.py and sdxl.py build on sd15.py the
same way.) Any field can then be overridden on the command line, named by its path:

    jaxcond train --config configs/sd15.py --workdir runs/sd15 --config.train.steps=300

The training defaults (optimizer, steps, batch, schedule) are the built-in demo's, a tiny
model trained from scratch; fine-tuning configs such as sd15.py set their own.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Everything random in the run (masks, noise, timesteps, data order) descends from this;
    # an integer in [0, 2**31).
    c.seed = 0

    # --- Model -------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # Names the model family module: demo | unet_clip (Stable Diffusion 1.x/2.x, SDXL) | a
    # dotted module path defining FAMILY, see jaxcond/models/registry.py.
    c.model.family = "unet_clip"
    # The weights: a diffusers-format folder (Flax or PyTorch .safetensors weights), a hub id
    # when online, or a single-file .safetensors (with model.base).
    c.model.source = ""
    # For a single-file source (an original-layout SD 1.x/SDXL .safetensors): a diffusers
    # folder or hub id of its family, read for its configs and tokenizers only; "" otherwise.
    c.model.base = ""
    # Text-encoder layer conditioning the UNet: 1 = last, 2 = penultimate (SD's "clip skip"); >= 1.
    c.model.clip_skip = 1
    # Fine-tune the text encoder(s) with the UNet (the `empty` null then follows them): True | False.
    c.model.train_text_encoder = False
    # UNet rematerialisation (gradient checkpointing), less activation memory for a second
    # forward pass of what is recomputed: none | layers (each transformer and res block) |
    # layers_keep_matmuls (there, only the ops between matmuls) | blocks (each UNet
    # down/mid/up block) | blocks_keep_matmuls | full (the whole UNet). jaxcond/models/remat.py.
    c.model.remat = "none"
    # UNet: each spatial transformer runs its blocks as one scan over their stacked params:
    # the same result from a smaller program, which compiles faster in less host memory
    # (SDXL's 70 transformer blocks become 11): True | False. jaxcond/models/remat.py.
    c.model.scan_layers = False
    # Frozen weights (VAE, frozen text encoders, a LoRA run's base UNet) stored as: float32 |
    # bfloat16 (half the memory; the model then computes from bfloat16-rounded weights).
    c.model.frozen_dtype = "float32"
    # LoRA adapters (jaxcond/models/lora.py): rank 0 = off (full fine-tune). With rank > 0
    # only the adapters (and learned nulls) train; the base weights are frozen.
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0  # e.g. 16
    c.model.lora.alpha = 0.0  # The update is scaled by alpha / rank; 0 = the rank (scale 1).
    # What is adapted: attention (the UNet's to_q/k/v/out), feed_forward, resnet_convs; with
    # model.train_text_encoder the text encoders' text_attention and text_mlp (both if neither).
    c.model.lora.targets = ("attention",)
    c.model.lora.seed = 0  # Initialisation of the adapters' down matrices.
    c.model.lora.init_from = ""  # A LoRA .safetensors (diffusers or kohya layout) to continue from.

    # --- Data --------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # demo: the procedural shapes (jaxcond.data.demo) | folder: images with same-named .txt
    # captions | metadata: a metadata.jsonl/.csv with file_name and text columns | shards:
    # ArrayRecord shards written by `jaxcond shards` (jaxcond.data.shards) | hf: a Hugging
    # Face datasets folder (save_to_disk) or hub id (needs the hf extra).
    c.data.source = "folder"
    c.data.resolution = 16  # Image side in pixels (demo: 16 or 32); square if no buckets.
    # demo only:
    c.data.num_records = 20000  # Images in the training set; an epoch is num_records // global_batch steps.
    c.data.heldout_fraction = 0.1  # Share of (shape, colour, background) combinations never trained on.
    c.data.seed = 0  # Seed of the dataset's content (not of its order, which follows c.seed).
    # folder / metadata / shards / hf only:
    c.data.path = ""  # The folder, the metadata file (or its folder), the shards folder, or the dataset.
    c.data.hf_split = "train"  # hf: the split.
    c.data.image_column = "image"  # hf: column of the images.
    c.data.caption_column = "text"  # hf: column of the captions.
    # (height, width) aspect-ratio buckets, e.g. ((32, 32), (24, 40)); () = square; "auto" =
    # chosen from the images' own sizes by the rule in jaxcond/data/buckets.py (fields below).
    # Any type: a tuple or the string "auto".
    c.data.buckets = ml_collections.FieldReference((), field_type=object)
    c.data.auto_buckets = ml_collections.ConfigDict()
    c.data.auto_buckets.area = 0  # Target pixels per bucket (each within 20% below it); 0 = resolution**2.
    c.data.auto_buckets.min_side = 0  # Shortest side in pixels; 0 = resolution / 2 (kohya's 256 at 512).
    c.data.auto_buckets.max_side = 0  # Longest side in pixels; 0 = 2 * resolution (kohya's 1024 at 512).
    c.data.auto_buckets.step = 0  # Sides are multiples of this (of the model's size multiple); 0 = that multiple.
    c.data.auto_buckets.max_buckets = 8  # At most this many buckets (each compiles once); >= 1.
    # Validation records (`eval.*`), never trained on: a fraction held out by (seed, record id),
    # the same on any host, or all records of a second path of the same source kind; 0 / "" = none.
    c.data.validation_fraction = 0.0
    c.data.validation_path = ""
    c.data.crop = "center"  # center | random (offsets from seed, epoch and record).
    c.data.flip = False  # Random horizontal flips (same determinism as the crop): True | False.
    c.data.caption_extension = ".txt"  # folder: captions in <image stem><this>, e.g. .caption (kohya).
    c.data.missing_caption = "skip"  # Image without caption: skip | empty (train it unconditionally).
    c.data.empty_caption = "keep"  # Empty caption: keep (an unconditional example) | skip.
    c.data.too_small = "upscale"  # Image smaller than its bucket: upscale | skip.
    c.data.caption_shuffle = False  # Shuffle comma-separated tags (after keep_tokens) each epoch.
    c.data.keep_tokens = 0  # Leading tags never shuffled or dropped; >= 0.
    c.data.tag_dropout = 0.0  # Drop each other tag with this probability, in [0, 1] (not caption dropout).
    c.data.eval_prompts = ()  # Prompts of the sample grids; () = the first training captions.
    # A folder written by `jaxcond cache` (decoded images + text-encoder outputs); "" = none.
    # Dropout still happens in the step; random crops/flips/caption augmentation can't be cached.
    c.data.cache = ""

    # --- Loader (how, not what: changing these never changes a batch) ------------------------
    c.loader = ml_collections.ConfigDict()
    c.loader.workers = 2  # Threads loading batches ahead (and checking images at start); >= 1.
    c.loader.prefetch = 4  # Batches kept ready; >= 1.
    c.loader.processes = 0  # Worker processes instead of threads for heavy decoding; 0 = none.

    # --- Conditional dropout (the contract is in jaxcond/dropout.py) -------------------------
    c.dropout = ml_collections.ConfigDict()
    # Groups drop their members together; each group has its own rate and schedule.
    c.dropout.groups = ml_collections.ConfigDict()
    # The caption group: the text conditioners, dropped together for classifier-free guidance.
    c.dropout.groups.caption = ml_collections.ConfigDict()
    c.dropout.groups.caption.members = ("text", "pooled")  # Dropping text without pooled leaks the caption.
    c.dropout.groups.caption.rate = 0.1  # Drop probability in [0, 1]; Ho & Salimans found 0.1-0.2 best.
    c.dropout.groups.caption.schedule = "constant"  # constant | linear_warmup | every_n_epochs
    c.dropout.groups.caption.warmup_steps = 0  # linear_warmup: steps from 0 to `rate`.
    c.dropout.groups.caption.every_n_epochs = 0  # every_n_epochs: period n.
    c.dropout.groups.caption.epoch_rate = 1.0  # every_n_epochs: rate in every n-th epoch.
    # Null per conditioner: empty (encoded "") | zeros | learned (trainable, starts as empty).
    c.dropout.nulls = ml_collections.ConfigDict()
    c.dropout.nulls.text = "learned"  # The caption's per-token encoder output.
    c.dropout.nulls.pooled = "learned"  # The pooled caption embedding.

    # --- Diffusion objective -----------------------------------------------------------------
    c.diffusion = ml_collections.ConfigDict()
    # ddpm (Stable Diffusion 1.x/2.x, SDXL) | flow (rectified flow: SD3/3.5). Fine-tuning keeps the
    # pretrained model's; the fields below are DDPM's, the flow_* ones the flow objective's.
    c.diffusion.objective = "ddpm"
    c.diffusion.num_train_timesteps = 1000  # DDPM steps; >= 2.
    c.diffusion.beta_schedule = "squaredcos_cap_v2"  # linear | scaled_linear | squaredcos_cap_v2
    c.diffusion.beta_start = 0.0001  # linear/scaled_linear only.
    c.diffusion.beta_end = 0.02  # linear/scaled_linear only.
    # What the UNet predicts; fine-tuning keeps the pretrained model's.
    c.diffusion.prediction_type = "v_prediction"  # epsilon | v_prediction
    c.diffusion.snr_gamma = 5.0  # Min-SNR-gamma loss weighting; 0 turns it off.
    c.diffusion.noise_offset = 0.0  # Per-channel offset noise scale; 0 turns it off.
    # Flow: sigma = shift(u), u from the density below; the network sees sigma * 1000.
    # fixed (SD3: flow_shift) | resolution (Flux: exp(mu), mu linear in the image's tokens from
    # flow_base_shift at 256 to flow_max_shift at 4096).
    c.diffusion.flow_shift_mode = "fixed"
    c.diffusion.flow_shift = 3.0  # SD3's shift (more steps at high noise); 1 = none.
    c.diffusion.flow_base_shift = 0.5  # resolution mode: mu at 256 tokens.
    c.diffusion.flow_max_shift = 1.15  # resolution mode: mu at 4096 tokens.
    c.diffusion.flow_timestep_sampling = "logit_normal"  # logit_normal | mode | uniform (SD3 paper, 3.1)
    c.diffusion.flow_logit_mean = 0.0  # logit_normal's mean; > 0 trains more at high noise.
    c.diffusion.flow_logit_std = 1.0  # logit_normal's standard deviation.
    c.diffusion.flow_mode_scale = 1.29  # `mode` density's scale, in [0, 1.75].
    # Loss weights per example: none (the density above does the weighting) | sigma_sqrt | cosmap.
    c.diffusion.flow_weighting = "none"

    # --- Optimizer ---------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    # adamw | lion | adafactor (factored second moments: far less state for big matrices).
    c.optim.name = "adamw"
    c.optim.lr = 2e-3  # Peak learning rate; > 0.
    c.optim.schedule = "cosine"  # cosine | constant (both after linear warm-up).
    c.optim.warmup_steps = 100  # Linear learning-rate warm-up; >= 0.
    c.optim.end_lr_fraction = 0.05  # cosine: final lr as a fraction of the peak, in [0, 1].
    c.optim.weight_decay = 1e-4  # Decoupled weight decay (AdamW, Lion; Adafactor's decay rate).
    c.optim.b1 = 0.9  # Adam/Lion beta1, in [0, 1).
    c.optim.b2 = 0.999  # Adam/Lion beta2, in [0, 1) (Lion's authors use 0.99).
    c.optim.eps = 1e-8  # Adam epsilon; > 0.
    # float32 | bfloat16: the first moment's dtype (AdamW's mu, Lion's momentum); bfloat16
    # halves it. AdamW's second moment stays in the params' dtype (optax).
    c.optim.moment_dtype = "float32"
    c.optim.grad_clip = 1.0  # Global-norm gradient clipping; 0 turns it off.
    c.optim.ema_decay = 0.999  # EMA of the trainable params (sampling uses it), warmed up; 0 turns it off.
    # params | float32 | bfloat16: the EMA's storage dtype (averaged in float32, then rounded):
    # params = train.param_dtype; bfloat16 halves it, but loses updates below its precision.
    c.optim.ema_dtype = "params"

    # --- Training ----------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000  # Optimizer updates in the whole run; >= 1.
    c.train.global_batch = 32  # Examples per optimizer update, over all devices and hosts.
    c.train.grad_accum = 1  # Micro-batches per update (global_batch must divide evenly).
    c.train.param_dtype = "float32"  # Storage dtype of trainable params, optimizer state: float32 | bfloat16.
    c.train.compute_dtype = "float32"  # float32 | bfloat16 (halves activation memory on TPU/GPU).
    c.train.log_every = 25  # Steps between logged scalars (TensorBoard, metrics.jsonl, W&B); >= 1.
    c.train.sample_every = 1000  # Steps between sample grids (0: only at the end).
    # Updates with a non-finite loss or gradient are skipped (params, optimizer state and EMA
    # unchanged) and counted; past this many the run checkpoints and stops. -1: never stop.
    c.train.max_skipped_updates = 10

    # --- Devices -----------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Data-parallel axis size; -1 takes all remaining devices.
    c.mesh.fsdp = 1  # Parameter-sharding axis size (batch is also split over it); -1 as for data.
    c.mesh.dcn_data = 1  # TPU slices the data axis spans (multi-slice); must divide mesh.data.
    c.mesh.fsdp_min_size = 512  # Tensors with fewer elements stay replicated (not worth a gather).

    # --- Checkpoints -------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # Save interval; the last step is always saved.
    c.checkpoint.keep = 3  # Newest checkpoints kept on disk; >= 1.
    c.checkpoint.async_save = True  # Write in the background while training continues: True | False.
    # gs:// only: retries of a failed checkpoint request, delays doubling from 1 s to 32 s (10: ~3 min
    # of outage survived) before the run stops with an error, its newest complete checkpoint intact.
    c.checkpoint.storage_retries = 10

    # --- Logging (TensorBoard always, in <workdir>/tb; Weights & Biases optionally) ----------
    c.logging = ml_collections.ConfigDict()
    # Also log to W&B from process 0: the TensorBoard scalars, the sample grids and this config;
    # a resume continues the same W&B run. Needs the wandb extra (pip install 'jaxcond[wandb]').
    c.logging.wandb = False
    c.logging.wandb_project = "jaxcond"  # The W&B project.
    c.logging.wandb_name = ""  # The W&B run's name; "" = the --workdir's folder name.
    c.logging.wandb_entity = ""  # The W&B user or team; "" = your account's default entity.
    # online (needs `wandb login` or WANDB_API_KEY) | offline (files only, in <workdir>/wandb;
    # upload them later with `wandb sync`).
    c.logging.wandb_mode = "online"

    # --- Sampling (validation grids; dropout is never applied here) --------------------------
    c.sample = ml_collections.ConfigDict()
    c.sample.num_prompts = 12  # Held-out captions in the grid (rows).
    c.sample.per_prompt = 5  # Samples per caption and guidance scale for the adherence numbers.
    c.sample.guidance = (1.0, 3.0, 5.0)  # Classifier-free guidance scales (columns), each >= 0.
    c.sample.steps = 25  # Sampler steps per image; >= 1.
    c.sample.scheduler = "ddim"  # ddim | euler | euler_a (ancestral) | dpm++ (2M); see jaxcond/sampling.py.
    c.sample.use_ema = True  # Sample with the EMA params: True | False.
    c.sample.seed = 1234  # Sampling noise seed (independent of training).

    # --- Validation losses (on data.validation_fraction / validation_path; jaxcond/validation.py) --
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # Steps between validation losses (also at the end); 0 = never in training.
    c.eval.bands = 4  # Fixed timesteps per example: the midpoints of this many equal bands.
    c.eval.max_examples = 256  # The first this many validation records (by record id).
    c.eval.batch = 16  # Examples per forward pass (rounded up to a multiple of the device count).
    return c
