"""Train megaedge's shipped fixture: a small Qwen3-ASR (transformers' native classes) + robustness LoRA + router.

    python training/train_fixture.py --work WORKDIR [--seed 0] [--base-minutes 45] [--lora-minutes 12]

Stages (each cached in WORKDIR, so a re-run resumes): speech -> tokenizer -> base -> degraded -> lora -> router ->
ship (checkpoint + held-out clips + calibration clips into megaedge/assets/fixture) -> evaluate (tables).
Not run by CI: it needs espeak-ng and about an hour on two CPU cores. Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import commands  # noqa: E402

from megaedge.export import layout  # noqa: E402
from megaedge.runtime import features  # noqa: E402

log = logging.getLogger("megaedge.training")
ASSETS = HERE.parent / "megaedge" / "assets" / "fixture"
BASE_NAME = "Qwen3-ASR-Fixture"
RATE = 16000
CONDITIONS = ("noise", "far_field", "obstruction", "reverberation", "recording", "distortion", "dropout")
LANG_PREFIX = "language English<asr_text>"

# Small enough to train on two CPU cores in about an hour; every other number is Qwen3-ASR's.
AUDIO = {"d_model": 160, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 448,
         "downsample_hidden_size": 48, "output_dim": 160}
TEXT = {"hidden_size": 160, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 40}
ROUTER = {"d_model": 64, "nhead": 4, "dim_feedforward": 128}
ENCODER_RANK, DECODER_RANK = 16, 8

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
            "<timestamp>"]
ASR_TEXT = "<asr_text>"  # added but NOT special: decoding keeps it, as in Qwen3-ASR


# ---------------------------------------------------------------- speech
def stage_speech(work: Path, seed: int, train_count: int, test_count: int) -> None:
    out = work / "speech.npz"
    if out.exists():
        return
    pool = commands.sentences(12000, seed)
    train_sents = [s for s in pool if not commands.is_test_sentence(s)]
    test_sents = [s for s in pool if commands.is_test_sentence(s)]
    rng = np.random.default_rng(seed)
    items = {"train": [], "test": []}
    for split, sents, count in (("train", train_sents, train_count), ("test", test_sents, test_count)):
        for i in range(count):
            text = sents[i % len(sents)]
            voice = commands.random_voice(rng, split)
            audio = commands.synthesize(text, voice)
            # Leading / trailing silence and level vary as they do from a real push-to-talk button.
            lead, tail = rng.integers(800, 5000, 2)
            audio = np.pad(audio, (int(lead), int(tail))) * float(10 ** (rng.uniform(-14, 0) / 20))
            items[split].append({"text": text, "voice": voice.name, "speed": voice.speed, "pitch": voice.pitch,
                                 "audio": audio.astype(np.float32)})
        log.info("%s: %d utterances, %.1f min", split, count, sum(len(x["audio"]) for x in items[split]) / RATE / 60)
    np.savez(out, meta=json.dumps({k: [{kk: vv for kk, vv in x.items() if kk != "audio"} for x in v]
                                   for k, v in items.items()}),
             **{f"{k}_{i}": x["audio"] for k, v in items.items() for i, x in enumerate(v)})


def load_speech(work: Path) -> dict[str, list[dict]]:
    data = np.load(work / "speech.npz")
    meta = json.loads(str(data["meta"]))
    return {k: [{**m, "audio": data[f"{k}_{i}"]} for i, m in enumerate(v)] for k, v in meta.items()}


# ---------------------------------------------------------------- tokenizer
def stage_tokenizer(work: Path, speech: dict) -> Path:
    path = work / "tokenizer.json"
    if path.exists():
        return path
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [LANG_PREFIX.replace(ASR_TEXT, " ") + x["text"] for x in speech["train"]]
    corpus += ["language English", "system", "user", "assistant", "\n"] * 50
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(ASR_TEXT, special=False, normalized=False)])
    tok.save(str(path))
    return path


def tokenizer_config(tok) -> dict:
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": bool(t.special)}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    return {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "clean_up_tokenization_spaces": False, "model_max_length": 4096, "split_special_tokens": False,
            "extra_special_tokens": {"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                                     "audio_eos_token": "<|audio_end|>"}}


def special_ids(tok) -> dict:
    ids = {name: tok.token_to_id(name) for name in [*SPECIALS, ASR_TEXT]}
    if any(v is None for v in ids.values()):
        raise RuntimeError(f"tokenizer lacks special tokens: {ids}")
    return ids


# ---------------------------------------------------------------- model
def make_config(tok):
    from transformers import Qwen3ASRConfig

    ids = special_ids(tok)
    text = {"vocab_size": tok.get_vocab_size(), "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, **TEXT}
    return Qwen3ASRConfig(
        audio_config={"num_mel_bins": 128, "n_window": 50, "n_window_infer": 800, **AUDIO},
        text_config=text, tie_word_embeddings=True, audio_token_id=ids["<|audio_pad|>"],
        pad_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|endoftext|>"], ids["<|im_end|>"]],
        timestamp_token_id=ids["<timestamp>"],
    )


class Batcher:
    """Length-bucketed batches of (features, prompt+answer ids, labels) built exactly as the processor would."""

    def __init__(self, tok, feats: list[np.ndarray], texts: list[str], batch_size: int, seed: int):
        ids = special_ids(tok)
        enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
        self.prefix = ([ids["<|im_start|>"]] + enc("system\n") + [ids["<|im_end|>"]] + enc("\n") +
                       [ids["<|im_start|>"]] + enc("user\n") + [ids["<|audio_start|>"]])
        self.suffix = ([ids["<|audio_end|>"], ids["<|im_end|>"]] + enc("\n") + [ids["<|im_start|>"]] +
                       enc("assistant\n"))
        self.audio_id, self.pad_id = ids["<|audio_pad|>"], ids["<|endoftext|>"]
        self.answers = [enc(LANG_PREFIX + t) + [ids["<|im_end|>"]] for t in texts]
        self.content = [enc(t) for t in texts]  # CTC targets (training-only auxiliary head)
        self.feats, self.batch_size = feats, batch_size
        self.rng = np.random.default_rng(seed)

    def epoch(self):
        order = np.argsort([f.shape[1] + self.rng.uniform(0, 40) for f in self.feats])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        self.rng.shuffle(batches)
        yield from batches

    def make(self, index, spec_augment: bool):
        import torch

        feats = [self.feats[i].astype(np.float32) for i in index]
        frames = -(-max(f.shape[1] for f in feats) // 100) * 100
        x = np.zeros((len(feats), 128, frames), np.float32)
        mask = np.zeros((len(feats), frames), np.int64)
        rows, labels = [], []
        for b, (i, f) in enumerate(zip(index, feats)):
            f = f.copy()
            if spec_augment:
                for _ in range(2):
                    w = int(self.rng.integers(0, 16))
                    s = int(self.rng.integers(0, 128 - w))
                    f[s : s + w] = f.mean()
                for _ in range(max(1, f.shape[1] // 100)):
                    w = int(self.rng.integers(0, 12))
                    s = int(self.rng.integers(0, max(1, f.shape[1] - w)))
                    f[:, s : s + w] = f.mean()
            x[b, :, : f.shape[1]] = f
            mask[b, : f.shape[1]] = 1
            n_audio = features.audio_token_count(f.shape[1])
            prompt = self.prefix + [self.audio_id] * n_audio + self.suffix
            rows.append(prompt + self.answers[i])
            labels.append([-100] * len(prompt) + self.answers[i])
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        lab = torch.full((len(rows), length), -100, dtype=torch.long)
        att = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (r, lbl) in enumerate(zip(rows, labels)):
            ids[b, : len(r)] = torch.tensor(r)
            lab[b, : len(lbl)] = torch.tensor(lbl)
            att[b, : len(r)] = 1
        self.last_ctc = ([features.audio_token_count(self.feats[i].shape[1]) for i in index],
                         [self.content[i] for i in index])
        return {"input_ids": ids, "attention_mask": att, "labels": lab, "input_features": torch.from_numpy(x),
                "input_features_mask": torch.from_numpy(mask)}


def asr_features(audios) -> list[np.ndarray]:
    return [features.asr_log_mel(a, pad_to_chunk=False).mel.astype(np.float16) for a in audios]


class CtcHead:
    """Training-only CTC loss on the projector output: it teaches the encoder to carry the words quickly, so the
    decoder's attention finds them (without it the LLM sits on the grammar prior for thousands of steps).
    The head is discarded; the shipped model is plain Qwen3-ASR."""

    def __init__(self, model, vocab: int, weight: float):
        import torch

        self.linear = torch.nn.Linear(model.config.audio_config.output_dim, vocab + 1)  # last index = blank
        self.weight, self.blank, self.captured = weight, vocab, None
        model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: setattr(self, "captured", out))

    def loss(self, lengths: list[int], targets: list[list[int]]):
        import torch

        logp = torch.log_softmax(self.linear(self.captured).float(), dim=-1)
        parts = torch.split(logp, lengths)
        padded = torch.nn.utils.rnn.pad_sequence(parts)  # [T, B, V]
        flat = torch.tensor([t for seq in targets for t in seq])
        return self.weight * torch.nn.functional.ctc_loss(
            padded, flat, torch.tensor(lengths), torch.tensor([len(t) for t in targets]), blank=self.blank,
            zero_infinity=True)


def train_loop(model, params, batcher: Batcher, minutes: float, lr: float, spec_augment: bool, name: str,
               ctc: CtcHead | None = None) -> list:
    import torch

    if ctc is not None:
        params = list(params) + list(ctc.linear.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    deadline = time.time() + minutes * 60
    total_est = None
    step, history, start = 0, [], time.time()
    model.train()
    while time.time() < deadline:
        for index in batcher.epoch():
            if time.time() >= deadline:
                break
            elapsed = time.time() - start
            if step == 50:
                total_est = int(minutes * 60 / (elapsed / 50))
            warm = min(1.0, (step + 1) / 200)
            progress = min(1.0, elapsed / (minutes * 60))
            for group in opt.param_groups:
                group["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
            # SpecAugment only after the alignment is found: masking makes the first steps harder.
            loss = model(**batcher.make(index, spec_augment and step > 600)).loss
            if ctc is not None:
                loss = loss + ctc.loss(*batcher.last_ctc)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append(float(loss))
            step += 1
            if step % 100 == 0:
                log.info("%s step %d/%s loss %.4f (%.0f s)", name, step, total_est, np.mean(history[-100:]), elapsed)
    model.eval()
    return history


def stage_base(work: Path, speech: dict, tok, seed: int, minutes: float):
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    path = work / "base.pt"
    config = make_config(tok)
    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("base model: %.2f M parameters", n_params / 1e6)
    feats = asr_features(x["audio"] for x in speech["train"])
    batcher = Batcher(tok, feats, [x["text"] for x in speech["train"]], 24, seed)
    ctc = CtcHead(model, config.text_config.vocab_size, weight=0.5)
    history = train_loop(model, list(model.parameters()), batcher, minutes, 2e-3, True, "base", ctc)
    torch.save(model.state_dict(), path)
    (work / "base_loss.json").write_text(json.dumps(history))
    return model


# ---------------------------------------------------------------- degraded speech + LoRA
def degrade(audio: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, str]:
    from megaedge.calibration import scenarios

    seed = int(rng.integers(1 << 31))
    if rng.random() < 0.5:
        name = CONDITIONS[int(rng.integers(len(CONDITIONS)))]
        return scenarios.apply_atomic(name, audio, RATE, severity, seed), name
    names = sorted(scenarios.SCENARIOS)
    name = names[int(rng.integers(len(names)))]
    return scenarios.apply(name, audio, RATE, severity, seed), name


def stage_degraded(work: Path, speech: dict, seed: int) -> list[dict]:
    path = work / "degraded.npz"
    if not path.exists():
        rng = np.random.default_rng(seed + 10)
        out, meta = {}, []
        for i, item in enumerate(speech["train"]):
            audio, name = degrade(item["audio"], rng, float(rng.uniform(0.3, 1.0)))
            out[f"a{i}"] = audio.astype(np.float32)
            meta.append({"condition": name, "source": i})
        np.savez(path, meta=json.dumps(meta), **out)
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    return [{**m, "audio": data[f"a{i}"], "text": speech["train"][m["source"]]["text"]} for i, m in enumerate(meta)]


def lora_targets(model) -> dict[str, tuple[int, int]]:
    """Native module name -> (rank, alpha) for every module the Mega-ASR adapter covers."""
    import torch

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        if name.startswith("model.audio_tower.") or name.startswith("model.multi_modal_projector."):
            out[name] = (ENCODER_RANK, 2 * ENCODER_RANK)
        elif name.startswith("model.language_model."):
            out[name] = (DECODER_RANK, 2 * DECODER_RANK)
    return out


class LoraLinear:
    """Training-time LoRA on one nn.Linear: y = W x + (alpha / r) * B (A x)."""

    @staticmethod
    def wrap(linear, rank: int, alpha: int, gen):
        import torch

        linear.lora_a = torch.nn.Parameter(torch.randn(rank, linear.in_features, generator=gen) / math.sqrt(linear.in_features))
        linear.lora_b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
        linear.lora_scale = alpha / rank
        base_forward = linear.forward

        def forward(x):
            return base_forward(x) + linear.lora_scale * ((x @ linear.lora_a.T) @ linear.lora_b.T)

        linear.forward = forward


def stage_lora(work: Path, model, speech: dict, degraded: list[dict], tok, seed: int, minutes: float) -> dict:
    import torch

    path = work / "lora.pt"
    targets = lora_targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 20)
    modules = dict(model.named_modules())
    for name, (rank, alpha) in targets.items():
        LoraLinear.wrap(modules[name], rank, alpha, gen)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    if path.exists():
        state = torch.load(path)
        for name in targets:
            modules[name].lora_a.data.copy_(state[name + ".a"])
            modules[name].lora_b.data.copy_(state[name + ".b"])
    else:
        # Mostly degraded audio, some clean so that the LoRA route stays good on clean speech too.
        mix = degraded + speech["train"][: len(speech["train"]) // 4]
        batcher = Batcher(tok, asr_features(x["audio"] for x in mix), [x["text"] for x in mix], 24, seed + 21)
        history = train_loop(model, params, batcher, minutes, 3e-3, True, "lora")
        torch.save({**{n + ".a": modules[n].lora_a.detach() for n in targets},
                    **{n + ".b": modules[n].lora_b.detach() for n in targets}}, path)
        (work / "lora_loss.json").write_text(json.dumps(history))
    trained = {n: (modules[n].lora_a.detach().clone(), modules[n].lora_b.detach().clone(), *targets[n]) for n in targets}
    for name in targets:  # back to the plain base model
        m = modules[name]
        del m.forward
        for attr in ("lora_a", "lora_b"):
            delattr(m, attr)
        del m.lora_scale
    return trained


def saved_lora_name(native: str) -> str:
    """Original-layout name (as the Mega-ASR adapter saves it) for a native module, without the thinker. prefix."""
    original = layout.native_to_original(native + ".weight")[: -len(".weight")]
    return original[len("thinker.") :] if original.startswith("thinker.") else original


def write_adapter(trained: dict, out_dir: Path) -> None:
    """Save in the Mega-ASR adapter format: per-module rank/alpha patterns, BOTH decoder namespaces (each trained
    decoder LoRA is split by rank into ``model.layers.N`` and ``layers.N`` halves), and a blocks file on every third
    module (two rank slices with different alphas, B rescaled so the folded delta is unchanged)."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, ranks, alphas, blocks = {}, {}, {}, {}

    def put(raw: str, a, b, rank: int, alpha: float, block: bool, whole_block: bool = False):
        key = f"base_model.model.thinker.{raw}"
        ranks["thinker." + raw], alphas["thinker." + raw] = rank, alpha
        if whole_block:  # one slice at the pattern's scale: the same delta as no blocks entry
            blocks["thinker." + raw] = [{"start": 0, "end": rank, "rank": rank, "alpha": alpha}]
        elif block and rank >= 2:
            cut = rank // 2
            b = b.clone()
            b[:, cut:] *= 0.5  # second slice's alpha doubles its scale
            blocks["thinker." + raw] = [{"start": 0, "end": cut, "rank": cut, "alpha": alpha * cut / rank},
                                        {"start": cut, "end": rank, "rank": rank - cut,
                                         "alpha": 2 * alpha * (rank - cut) / rank}]
        tensors[key + ".lora_A.weight"] = a.contiguous()
        tensors[key + ".lora_B.weight"] = b.contiguous()

    for i, (native, (a, b, rank, alpha)) in enumerate(sorted(trained.items())):
        raw = saved_lora_name(native)
        block = i % 3 == 0
        if raw.startswith("model.layers."):
            half = rank // 2
            put(raw, a[:half], b[:, :half], half, alpha * half / rank, block)
            # When the model.layers half has blocks, the layers half needs an entry of its own: upstream's lookup
            # (blocks[raw] or blocks[thinker.model.layers...]) would otherwise hand it the other half's slices.
            put(raw[len("model.") :], a[half:], b[:, half:], rank - half, alpha * (rank - half) / rank, False,
                whole_block=block and half >= 2)
        else:
            put(raw, a, b, rank, alpha, block)
    save_file({k: v.to(torch.float32) for k, v in tensors.items()}, str(out_dir / layout.ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ENCODER_RANK, "lora_alpha": 2 * ENCODER_RANK,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "target_modules": ".*", "rank_pattern": ranks, "alpha_pattern": alphas,
              "base_model_name_or_path": BASE_NAME}
    (out_dir / layout.ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    (out_dir / layout.ADAPTER_BLOCKS).write_text(json.dumps(blocks, indent=1))


# ---------------------------------------------------------------- router
def stage_router(work: Path, speech: dict, degraded: list[dict], seed: int, minutes: float):
    import torch

    from megaedge.export.router import RouterConfig, build_router, save_router

    path = work / "router.safetensors"
    if path.exists():
        return path
    torch.manual_seed(seed + 30)
    model = build_router(RouterConfig(**ROUTER))
    clean = [features.router_log_mel(x["audio"]).T for x in speech["train"]]
    bad = [features.router_log_mel(x["audio"]).T for x in degraded]
    data = [(m, 0) for m in clean] + [(m, 1) for m in bad]
    rng = np.random.default_rng(seed + 31)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    deadline, step = time.time() + minutes * 60, 0
    model.train()
    while time.time() < deadline:
        # Batches of similar length (crops stay long enough to judge quality), in random order.
        order = np.argsort([m.shape[0] + rng.uniform(0, 60) for m, _ in data])
        batches = [order[s : s + 32] for s in range(0, len(order) - 31, 32)]
        rng.shuffle(batches)
        for batch in batches:
            if time.time() >= deadline:
                break
            group = [data[i] for i in batch]
            frames = min(m.shape[0] for m, _ in group)
            crops = []
            for m, _ in group:
                off = int(rng.integers(0, m.shape[0] - frames + 1))
                # log10-mel + offset = a level change of up to +-10 dB: quality, not loudness, decides the route
                crops.append(m[off : off + frames] + np.float32(rng.uniform(-0.25, 0.25)))
            x = torch.from_numpy(np.stack(crops))
            y = torch.tensor([label for _, label in group])
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                log.info("router step %d loss %.4f", step, float(loss))
    model.eval()
    save_router(model, path)
    return path


# ---------------------------------------------------------------- ship
def original_config(config, tok) -> dict:
    from megaedge.export.factory import _original_config_dict

    doc = _original_config_dict(config)
    ids = special_ids(tok)
    thinker = doc["thinker_config"]
    thinker.update({"audio_start_token_id": ids["<|audio_start|>"], "audio_end_token_id": ids["<|audio_end|>"],
                    "eos_token_id": list(config.eos_token_id), "pad_token_id": config.pad_token_id,
                    "timestamp_token_id": config.timestamp_token_id})
    doc["support_languages"] = ["English"]
    return doc


def ship_checkpoint(model, trained: dict, router_path: Path, tok, tokenizer_file: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    base = out / BASE_NAME
    base.mkdir(parents=True)
    state = {layout.native_to_original(k): v.detach().to(torch.float32).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(base / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(v.numel() * 4 for v in state.values())
    (base / layout.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                             "weight_map": weight_map}, indent=1))
    (base / "config.json").write_text(json.dumps(original_config(model.config, tok), indent=1))
    (base / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": list(model.config.eos_token_id), "pad_token_id": model.config.pad_token_id,
         "do_sample": False}, indent=1))
    shutil.copyfile(tokenizer_file, base / "tokenizer.json")
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=1))
    write_adapter(trained, out / layout.ADAPTER_DIR_NAME)
    (out / layout.ROUTER_DIR_NAME).mkdir()
    shutil.copyfile(router_path, out / layout.ROUTER_DIR_NAME / layout.ROUTER_FILE_NAME)


def write_clip(folder: Path, name: str, audio: np.ndarray) -> str:
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / f"{name}.flac", np.clip(audio, -1, 1), RATE, subtype="PCM_16")
    return f"clips/{name}.flac"


def ship_clips(speech: dict, out: Path, seed: int, per_condition: int, clean_count: int, mixed_count: int) -> None:
    """Held-out set (test sentences x test voices): clean, each atomic condition at severity 0.5-0.9, and field /
    combined scenarios; manifest in the calibration builder's JSONL format."""
    from megaedge.calibration import scenarios

    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(seed + 40)
    # A closed-vocabulary model cannot write a word it never heard: the sentence-level hash split put every
    # sentence of a few small templates (e.g. "call the shift leader") into test, so test sentences with words
    # absent from training (3 of 600) are left out of the shipped set.
    seen = {w for item in speech["train"] for w in item["text"].split()}
    test = [item for item in speech["test"] if all(w in seen for w in item["text"].split())]
    rows, k = [], 0

    def take():
        nonlocal k
        item = test[k % len(test)]
        k += 1
        return item

    for i in range(clean_count):
        item = take()
        rows.append({"id": f"clean-{i:03d}", "path": write_clip(out / "clips", f"clean-{i:03d}", item["audio"]),
                     "text": item["text"], "scenario": "clean", "conditions": [], "severity": 0.0,
                     "voice": item["voice"]})
    for cond in CONDITIONS:
        for i in range(per_condition):
            item, severity = take(), float(rng.uniform(0.5, 0.9))
            info: dict = {}
            audio = scenarios.apply_atomic(cond, item["audio"], RATE, severity, int(rng.integers(1 << 31)), info)
            name = f"{cond}-{i:03d}"
            rows.append({"id": name, "path": write_clip(out / "clips", name, audio), "text": item["text"],
                         "scenario": cond, "conditions": [cond], "severity": round(severity, 3),
                         "voice": item["voice"], "measured": _jsonable(info)})
    names = [s for s in sorted(scenarios.SCENARIOS) if "+" not in s] + sorted(
        s for s in scenarios.SCENARIOS if "+" in s)
    for i in range(mixed_count):
        item, severity = take(), float(rng.uniform(0.5, 0.9))
        scen = names[i % 4] if i < 8 else names[int(rng.integers(4, len(names)))]
        audio = scenarios.apply(scen, item["audio"], RATE, severity, int(rng.integers(1 << 31)))
        name = f"mixed-{i:03d}"
        rows.append({"id": name, "path": write_clip(out / "clips", name, audio), "text": item["text"],
                     "scenario": scen, "conditions": list(scenarios.get(scen).steps), "severity": round(severity, 3),
                     "voice": item["voice"]})
    with open(out / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def ship_calibration(speech: dict, out: Path, seed: int, count: int) -> None:
    """Wild-audio calibration clips for `megaedge export --int8` (training sentences and voices, never test)."""
    from megaedge.calibration import scenarios

    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(seed + 50)
    names = sorted(scenarios.SCENARIOS)
    rows = []
    for i in range(count):
        item = speech["train"][int(rng.integers(len(speech["train"])))]
        if i % 4 == 0:
            audio, scen = item["audio"], "clean"
        else:
            scen = names[int(rng.integers(len(names)))]
            audio = scenarios.apply(scen, item["audio"], RATE, float(rng.uniform(0.2, 1.0)), int(rng.integers(1 << 31)))
        name = f"calib-{i:03d}"
        rows.append({"id": name, "path": write_clip(out / "clips", name, audio), "text": item["text"],
                     "scenario": scen})
    with open(out / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return round(float(value), 4)
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-utterances", type=int, default=7000)
    parser.add_argument("--base-minutes", type=float, default=45)
    parser.add_argument("--lora-minutes", type=float, default=12)
    parser.add_argument("--router-minutes", type=float, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stop-after", choices=["speech", "base", "lora", "router", "ship"], default="ship")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    stage_speech(args.work, args.seed, args.train_utterances, 600)
    speech = load_speech(args.work)
    if args.stop_after == "speech":
        return 0
    from tokenizers import Tokenizer

    tokenizer_file = stage_tokenizer(args.work, speech)
    tok = Tokenizer.from_file(str(tokenizer_file))
    model = stage_base(args.work, speech, tok, args.seed, args.base_minutes)
    if args.stop_after == "base":
        return 0
    degraded = stage_degraded(args.work, speech, args.seed)
    trained = stage_lora(args.work, model, speech, degraded, tok, args.seed, args.lora_minutes)
    if args.stop_after == "lora":
        return 0
    router_path = stage_router(args.work, speech, degraded, args.seed, args.router_minutes)
    if args.stop_after == "router":
        return 0
    ship_checkpoint(model, trained, router_path, tok, tokenizer_file, ASSETS / "model")
    ship_clips(speech, ASSETS / "heldout", args.seed, per_condition=8, clean_count=28, mixed_count=12)
    ship_calibration(speech, ASSETS / "calibration", args.seed, count=32)
    log.info("shipped to %s", ASSETS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
