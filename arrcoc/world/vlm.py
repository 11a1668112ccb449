"""The project's small vision-language model: a timm ViT, a projector and a Llama-style LM in one transformers LLaVA.

``build_vlm`` makes a randomly initialised model, ``load_vlm`` the trained one shipped in ``weights/``. The
vision tower is a timm ViT (patch 16) behind ``TimmWrapperConfig``, so the encoder's weights are the very
tensors ``arrcoc.Pipeline.from_pretrained()`` loads from ``weights/encoder.safetensors``: the pipeline's
patch features and this model's visual features are the same numbers.

Visual tokens enter the language model as embeddings at the positions of the image token (one per visual
token), through :func:`embed_inputs`. That is how compressed tokens are fed too, so full and compressed
tokens take one road. The LLaVA ``pixel_values`` road is not used: transformers' LLaVA reads the tower's
``hidden_states``, which for a timm ViT come from ``forward_intermediates`` in ``NCHW`` layout without the
final norm (and, in transformers >= 5.2x, only when the config asks for hidden states), so it would not see
the features the pipeline sees. :func:`vision_features` is the reference instead.

Weights on disk (``save_vlm`` / ``load_vlm``): ``config.json`` (a :class:`~arrcoc.config.PipelineConfig`
naming the ViT), ``encoder.safetensors`` (the ViT), ``vlm.json`` (:class:`VLMConfig` and the tokenizer) and
``vlm.safetensors`` (projector and language model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import DEFAULT_WEIGHTS_DIR, PipelineConfig
from ..errors import InvalidInputError, MissingWeightsError
from ..integrations.token_positions import TokenPositions, add_token_positions
from ..stages.tokenizer import CharTokenizer
from .data import WORDS

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

__all__ = [
    "VLMConfig",
    "build_vlm",
    "load_vlm",
    "save_vlm",
    "vision_tower",
    "vision_features",
    "embed_inputs",
    "generate_answers",
    "load_language_parts",
    "DEFAULT_VLM_DIR",
]

logger = logging.getLogger(__name__)

#: The shipped model.
DEFAULT_VLM_DIR = DEFAULT_WEIGHTS_DIR


@dataclass(frozen=True)
class VLMConfig:
    """Sizes of the small VLM.

    Attributes:
        encoder: timm ViT name (patch 16); ``encoder_kwargs`` resize it (e.g. ``embed_dim``, ``depth``).
        hidden_size, num_layers, num_heads, intermediate_size: the Llama-style language model.
        max_positions: longest prompt plus answer, in tokens (a 384-pixel image alone is 576 tokens).
        token_positions: add each visual token's 2-D box to it (:class:`~arrcoc.integrations.token_positions.TokenPositions`),
            so that compressed tokens say where they lie. Off in models saved before it existed.
        seed: initialisation seed of :func:`build_vlm`.
    """

    encoder: str = "vit_small_patch16_224"
    encoder_kwargs: dict[str, Any] = field(default_factory=lambda: {"embed_dim": 256, "depth": 6, "num_heads": 4})
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    max_positions: int = 1280
    token_positions: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_kwargs", dict(self.encoder_kwargs))
        if self.hidden_size % self.num_heads:
            raise InvalidInputError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1; got {getattr(self, name)}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VLMConfig:
        """A preset: ``"default"`` (the shipped size) or ``"tiny"`` (tests)."""
        presets = {
            "default": cls(),
            "tiny": cls(
                encoder_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2},
                hidden_size=32,
                num_layers=1,
                num_heads=2,
                intermediate_size=64,
            ),
        }
        if name not in presets:
            raise InvalidInputError(f"unknown VLM preset {name!r}; choose one of {sorted(presets)}")
        return dataclasses.replace(presets[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def pipeline_config(self, **overrides: Any) -> PipelineConfig:
        """The :class:`PipelineConfig` whose encoder is this model's ViT."""
        return PipelineConfig(encoder=self.encoder, encoder_kwargs=self.encoder_kwargs, **overrides)


def build_vlm(
    config: VLMConfig | None = None,
    tokenizer: CharTokenizer | None = None,
) -> tuple[LlavaForConditionalGeneration, CharTokenizer]:
    """A randomly initialised VLM (deterministic by ``config.seed``; the global RNG is left untouched).

    Returns:
        The model (eval mode, float32, on the CPU) and its tokenizer.
    """
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, TimmWrapperConfig

    config = config or VLMConfig()
    tokenizer = tokenizer or CharTokenizer(words=WORDS)
    width = int(config.encoder_kwargs.get("embed_dim", 384))
    # dynamic_img_size: one tower serves 224 and 384 (position embeddings resampled the way the pipeline does).
    vision = TimmWrapperConfig(
        architecture=config.encoder,
        do_pooling=False,
        hidden_size=width,
        model_args={**config.encoder_kwargs, "dynamic_img_size": True},
    )
    vision.hidden_size = width  # some versions drop unknown constructor keys; the projector reads it
    text = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=196,
        projector_hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlavaForConditionalGeneration(llava)
    if config.token_positions:  # a submodule: saved, loaded and moved with the language parts
        model.token_positions = TokenPositions(config.hidden_size)
    model.arrcoc_config = config  # read by save_vlm
    return model.eval(), tokenizer


def vision_tower(model: LlavaForConditionalGeneration) -> nn.Module:
    """The timm ViT inside the model (the module whose weights are ``encoder.safetensors``)."""
    return model.model.vision_tower.timm_model


def _language_parts(model: LlavaForConditionalGeneration) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if "vision_tower." not in k}


def vision_features(model: LlavaForConditionalGeneration, pixels: Tensor) -> Tensor:
    """Patch features of images, exactly as the pipeline's encoder computes them.

    Args:
        pixels: ``(B, 3, S, S)`` RGB in [0, 1], ``S`` a multiple of 16.

    Returns:
        ``(B, N, D)`` features after the ViT's final norm, prefix (class) tokens dropped, raster order.
    """
    import timm

    tower = vision_tower(model)
    data = timm.data.resolve_model_data_config(tower)
    mean = torch.tensor(data["mean"], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(data["std"], device=pixels.device).view(1, 3, 1, 1)
    out = tower.forward_features((pixels - mean) / std)  # (B, P + N, D)
    return out[:, tower.num_prefix_tokens :]


def embed_inputs(
    model: LlavaForConditionalGeneration,
    input_ids: Tensor,
    visual: Tensor,
    boxes: Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> Tensor:
    """Token embeddings with the projected visual tokens written at the image-token positions, in order.

    Args:
        input_ids: ``(B, L)`` holding ``K`` image tokens per row.
        visual: ``(B, K, D)`` visual features in the ViT's space (full or compressed tokens).
        boxes, grid: where the tokens lie, ``(B, K, 4)`` (row, col, height, width in patches) on a ``(gh, gw)``
            grid; read by a model with ``token_positions`` only, and optional for full square grids.

    Returns:
        ``(B, L, H)`` inputs for the language model.

    Raises:
        InvalidInputError: the number of image tokens in a row differs from ``K``; or the model needs boxes
            that are missing.
    """
    image = input_ids == model.config.image_token_id  # (B, L)
    embeds = model.get_input_embeddings()(input_ids)
    projected = model.model.multi_modal_projector(visual.to(embeds.dtype))  # (B, K, H)
    if image.shape[0] != visual.shape[0] or image.sum() != visual.shape[0] * visual.shape[1]:  # ok-sync: a check
        raise InvalidInputError(
            f"{int(image.sum())} image tokens in the prompts, but {visual.shape[0]} x "
            f"{visual.shape[1]} visual tokens given"
        )
    projected = add_token_positions(model, projected, boxes, grid)
    return embeds.masked_scatter(image[..., None], projected.to(embeds.dtype))


@torch.no_grad()
def generate_answers(
    model: LlavaForConditionalGeneration,
    tokenizer: CharTokenizer,
    questions: Sequence[str],
    visual: Tensor,
    max_new_tokens: int = 8,
    boxes: Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> list[str]:
    """Greedy answers to ``questions`` about images given as visual tokens ``(B, K, D)`` (placed by ``boxes`` on
    ``grid``, as in :func:`embed_inputs`).

    Decoding recomputes the (short) sequence each step instead of keeping a cache: answers are a few
    characters, and this keeps to the part of the transformers API that is the same in every version.
    """
    batch = tokenizer([tokenizer.prompt(q) for q in questions], visual.shape[1], device=visual.device)
    embeds = embed_inputs(model, batch["input_ids"], visual, boxes, grid)
    mask, positions = batch["attention_mask"], batch["position_ids"]
    out = torch.full((len(questions), max_new_tokens), tokenizer.eos_token_id, dtype=torch.long, device=visual.device)
    done = torch.zeros(len(questions), dtype=torch.bool, device=visual.device)
    for step in range(max_new_tokens):
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
        token = torch.where(done, tokenizer.eos_token_id, logits.argmax(-1))  # (B,)
        out[:, step] = token
        done |= token == tokenizer.eos_token_id
        if bool(done.all()):  # ok-sync: stop early once every answer has ended
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None].to(embeds.dtype)], 1)
        mask = torch.cat([mask, mask.new_ones(len(questions), 1)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return [tokenizer.decode(row) for row in out.cpu()]  # ok-sync: the answers are text


# --- weights on disk ---------------------------------------------------------------------------------------
def save_vlm(
    model: LlavaForConditionalGeneration,
    tokenizer: CharTokenizer,
    folder: str | os.PathLike[str],
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write the model as ``config.json`` + ``encoder.safetensors`` (the pipeline's) + ``vlm.json`` + ``vlm.safetensors``.

    Args:
        dtype: storage type of the tensors (half precision halves the files; loading casts back to float32).
    """
    from safetensors.torch import save_file

    config: VLMConfig = getattr(model, "arrcoc_config", None) or VLMConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def cast(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().clone()  # ok-sync: saving
            for k, v in state.items()
        }  # clone: tied tensors

    save_file(cast(vision_tower(model).state_dict()), folder / "encoder.safetensors")
    save_file(cast(_language_parts(model)), folder / "vlm.safetensors")
    (folder / "config.json").write_text(config.pipeline_config().to_json())
    (folder / "vlm.json").write_text(
        json.dumps({"vlm": config.to_dict(), "tokenizer": json.loads(tokenizer.to_json())}, indent=2)
    )


def load_language_parts(
    model: LlavaForConditionalGeneration,
    state: dict[str, Tensor],
    source: str | os.PathLike[str],
    optional: Sequence[str] = (),
) -> set[str]:
    """Load the projector and language model (a ``vlm.safetensors``) into ``model``.

    Args:
        source: named in the error.
        optional: top-level submodules the state may lack (e.g. ``"token_positions"`` added to a saved model);
            they keep their initialisation.

    Returns:
        The ``optional`` submodules the state lacked.

    Raises:
        InvalidInputError: any other key is missing (the vision tower and the tied ``lm_head`` aside), or a key is
            unexpected.
    """
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "vision_tower." not in k and k != "lm_head.weight"]
    absent = {name for name in optional if any(k.startswith(f"{name}.") for k in missing)}
    missing = [k for k in missing if k.partition(".")[0] not in absent]
    if missing or result.unexpected_keys:
        raise InvalidInputError(
            f"{os.fspath(source)} does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return absent


def load_vlm(
    path: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
) -> tuple[LlavaForConditionalGeneration, CharTokenizer]:
    """Load the trained VLM (``weights/`` by default), float32, eval mode, offline.

    Raises:
        MissingWeightsError: the folder lacks ``vlm.json``, ``vlm.safetensors`` or ``encoder.safetensors``.
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else DEFAULT_VLM_DIR
    files = [folder / n for n in ("vlm.json", "vlm.safetensors", "encoder.safetensors")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MissingWeightsError(
            f"{os.fspath(folder)!r} holds no trained VLM: missing {missing}; "
            "train one with `python -m arrcoc.world.train`"
        )
    meta = json.loads(files[0].read_text())
    model, tokenizer = build_vlm(VLMConfig(**meta["vlm"]), CharTokenizer.from_json(json.dumps(meta["tokenizer"])))
    vision_tower(model).load_state_dict(load_file(files[2]))
    load_language_parts(model, load_file(files[1]), files[1])
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
