"""The built-in demo: a tiny pixel-space text-to-image model on procedural shapes.

Trains a ~1M-parameter diffusers UNet with a tiny CLIP text encoder (both built locally,
no download) on 16x16 images of one coloured shape on a coloured background, captioned
"a red circle on a blue background", with 10% caption dropout and a learned null.
On 2 CPU cores it takes 10-25 minutes (machines differ) and then writes `samples_final.png`: held-out
captions (combinations never seen in training) at guidance 1, 3 and 5, plus the
unconditional branch, and prints how often colours and shapes follow the caption.

    jaxcond train --config configs/demo.py --workdir runs/demo
    jaxcond train --config configs/demo.py --workdir runs/demo --config.train.steps=300
    jaxcond train --config configs/demo.py --workdir runs/shapes --config.train.steps=4000  # shapes follow too
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Everything random in the run (masks, noise, timesteps, data order) descends from this.
    c.seed = 0

    # --- Model -------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # A diffusers-format folder (Flax or PyTorch .safetensors weights), a hub id when online,
    # a single-file .safetensors (with model.base), or "demo" to build the tiny model below
    # into <workdir>/base_model.
    c.model.source = "demo"
    # For a single-file source (an original-layout SD 1.x/SDXL .safetensors): a diffusers
    # folder or hub id of its family, read for its configs and tokenizers only.
    c.model.base = ""
    # Text-encoder layer conditioning the UNet: 1 = last, 2 = penultimate (SD's "clip skip").
    c.model.clip_skip = 1
    # Fine-tune the text encoder(s) with the UNet (the `empty` null then follows them).
    c.model.train_text_encoder = False
    c.model.demo = ml_collections.ConfigDict()
    c.model.demo.unet_channels = (32, 64)  # One UNet level per entry, widths multiples of 32.
    c.model.demo.cross_attention_levels = 1  # Lowest levels with caption cross-attention.
    c.model.demo.layers_per_block = 1  # ResNet blocks per UNet level.
    c.model.demo.attention_heads = 4  # Cross-attention heads.
    # Pooled caption through SDXL's text_time embedding (the demo follows captions far better
    # with it); False builds a Stable Diffusion 1.x/2.x-style UNet (cross-attention only).
    c.model.demo.pooled = True
    c.model.demo.text_encoders = 1  # 2 builds SDXL's layout (text_encoder_2 with a projection).
    c.model.demo.time_embed_dim = 8  # Width of each SDXL-style micro-conditioning embedding.
    c.model.demo.text_width = 64  # CLIP hidden size (= UNet cross-attention width); 32 followed captions less.
    c.model.demo.text_layers = 2  # CLIP transformer layers.
    c.model.demo.text_heads = 4  # CLIP attention heads.
    c.model.demo.max_length = 12  # Tokens per caption incl. start/end; demo captions need 9.
    c.model.demo.init_seed = 0  # Seed of the random "pretrained" weights.
    # Widths of a VAE (Stable Diffusion's latent layout, 4 latent channels); () = pixel space.
    c.model.demo.vae_channels = ()

    # --- Data --------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # demo: the procedural shapes (jaxcond.data.demo) | folder: images with same-named .txt
    # captions | metadata: a metadata.jsonl/.csv with file_name and text columns | shards:
    # ArrayRecord shards written by `jaxcond shards` (jaxcond.data.shards) | hf: a Hugging
    # Face datasets folder (save_to_disk) or hub id (needs the hf extra).
    c.data.source = "demo"
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
    c.data.buckets = ()  # (height, width) aspect-ratio buckets, e.g. ((32, 32), (24, 40)); () = square.
    c.data.crop = "center"  # center | random (offsets from seed, epoch and record).
    c.data.flip = False  # Random horizontal flips (same determinism as the crop).
    c.data.caption_extension = ".txt"  # folder: captions in <image stem><this>, e.g. .caption (kohya).
    c.data.missing_caption = "skip"  # Image without caption: skip | empty (train it unconditionally).
    c.data.empty_caption = "keep"  # Empty caption: keep (an unconditional example) | skip.
    c.data.too_small = "upscale"  # Image smaller than its bucket: upscale | skip.
    c.data.caption_shuffle = False  # Shuffle comma-separated tags (after keep_tokens) each epoch.
    c.data.keep_tokens = 0  # Leading tags never shuffled or dropped.
    c.data.tag_dropout = 0.0  # Drop each other tag with this probability (not caption dropout).
    c.data.eval_prompts = ()  # Prompts of the sample grids; () = the first training captions.
    # A folder written by `jaxcond cache` (decoded images + text-encoder outputs); "" = none.
    # Dropout still happens in the step; random crops/flips/caption augmentation can't be cached.
    c.data.cache = ""

    # --- Loader (how, not what: changing these never changes a batch) ------------------------
    c.loader = ml_collections.ConfigDict()
    c.loader.workers = 2  # Threads loading batches ahead (and checking images at start).
    c.loader.prefetch = 4  # Batches kept ready.
    c.loader.processes = 0  # Worker processes instead of threads for heavy decoding; 0 = none.

    # --- Conditional dropout (the contract is in jaxcond/dropout.py) -------------------------
    c.dropout = ml_collections.ConfigDict()
    # Groups drop their members together; each group has its own rate and schedule.
    c.dropout.groups = ml_collections.ConfigDict()
    c.dropout.groups.caption = ml_collections.ConfigDict()
    c.dropout.groups.caption.members = ("text", "pooled")  # Dropping text without pooled leaks the caption.
    c.dropout.groups.caption.rate = 0.1  # Ho & Salimans found 0.1-0.2 best for guidance.
    c.dropout.groups.caption.schedule = "constant"  # constant | linear_warmup | every_n_epochs
    c.dropout.groups.caption.warmup_steps = 0  # linear_warmup: steps from 0 to `rate`.
    c.dropout.groups.caption.every_n_epochs = 0  # every_n_epochs: period n.
    c.dropout.groups.caption.epoch_rate = 1.0  # every_n_epochs: rate in every n-th epoch.
    # Null per conditioner: empty (encoded "") | zeros | learned (trainable, starts as empty).
    c.dropout.nulls = ml_collections.ConfigDict()
    c.dropout.nulls.text = "learned"
    c.dropout.nulls.pooled = "learned"

    # --- Diffusion objective -----------------------------------------------------------------
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_train_timesteps = 1000  # DDPM steps.
    c.diffusion.beta_schedule = "squaredcos_cap_v2"  # linear | scaled_linear | squaredcos_cap_v2
    c.diffusion.beta_start = 0.0001  # linear/scaled_linear only.
    c.diffusion.beta_end = 0.02  # linear/scaled_linear only.
    # v-prediction made the demo use its captions; with epsilon guidance changed little.
    c.diffusion.prediction_type = "v_prediction"  # epsilon | v_prediction
    c.diffusion.snr_gamma = 5.0  # Min-SNR-gamma loss weighting; 0 turns it off.
    c.diffusion.noise_offset = 0.0  # Per-channel offset noise scale; 0 turns it off.

    # --- Optimizer ---------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-3  # Peak learning rate (AdamW).
    c.optim.schedule = "cosine"  # cosine | constant (both after linear warm-up).
    c.optim.warmup_steps = 100  # Linear learning-rate warm-up.
    c.optim.end_lr_fraction = 0.05  # cosine: final lr as a fraction of the peak.
    c.optim.weight_decay = 1e-4  # AdamW decoupled weight decay.
    c.optim.b1 = 0.9  # Adam beta1.
    c.optim.b2 = 0.999  # Adam beta2.
    c.optim.eps = 1e-8  # Adam epsilon.
    c.optim.grad_clip = 1.0  # Global-norm gradient clipping; 0 turns it off.
    c.optim.ema_decay = 0.999  # EMA of the trainable params (sampling uses it), warmed up; 0 turns it off.

    # --- Training ----------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    # Optimizer updates in the whole run. 1500 and 2500 followed captions less; 4000 also
    # makes shapes follow them (README, Demo results), in twice the time.
    c.train.steps = 2000
    # Examples per optimizer update, over all devices and hosts. 64 x 1000 steps (the same
    # examples, ~1.25x faster on 2 cores) followed captions less: 56/60 backgrounds unguided;
    # 64 x 1300 (about this run's time) 57/60.
    c.train.global_batch = 32
    c.train.grad_accum = 1  # Micro-batches per update (global_batch must divide evenly).
    c.train.param_dtype = "float32"  # Storage dtype of trainable params and optimizer state.
    c.train.compute_dtype = "float32"  # bfloat16 halves activation memory on TPU/GPU.
    c.train.log_every = 25  # Steps between TensorBoard scalars.
    c.train.sample_every = 1000  # Steps between sample grids (0: only at the end); each costs ~15 s on 2 cores.
    # Updates with a non-finite loss or gradient are skipped (params, optimizer state and EMA
    # unchanged) and counted; past this many the run checkpoints and stops. -1: never stop.
    c.train.max_skipped_updates = 10

    # --- Devices -----------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Data-parallel axis size; -1 takes all remaining devices.
    c.mesh.fsdp = 1  # Parameter-sharding axis size (batch is also split over it).
    c.mesh.dcn_data = 1  # TPU slices the data axis spans (multi-slice); must divide mesh.data.
    c.mesh.fsdp_min_size = 512  # Tensors with fewer elements stay replicated (not worth a gather).

    # --- Checkpoints -------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # Save interval; the last step is always saved.
    c.checkpoint.keep = 3  # Newest checkpoints kept on disk.
    c.checkpoint.async_save = True  # Write in the background while training continues.

    # --- Sampling (validation grids; dropout is never applied here) --------------------------
    c.sample = ml_collections.ConfigDict()
    c.sample.num_prompts = 12  # Held-out captions in the grid (rows).
    c.sample.per_prompt = 5  # Samples per caption and guidance scale for the adherence numbers.
    c.sample.guidance = (1.0, 3.0, 5.0)  # Classifier-free guidance scales (columns).
    # Sampler steps. 25 and 50 scored a trained demo's held-out samples alike (within one
    # sample per line, three sampling seeds; README) and 25 takes half the time.
    c.sample.steps = 25
    c.sample.scheduler = "ddim"  # ddim | euler | euler_a (ancestral) | dpm++ (2M); see jaxcond/sampling.py.
    c.sample.use_ema = True  # Sample with the EMA params.
    c.sample.seed = 1234  # Sampling noise seed (independent of training).
    return c
