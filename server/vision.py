"""Images in chat prompts: the checkpoint's processor turns a rendered prompt and its images into token ids (one
run of image soft tokens per picture, where the chat template put its placeholder) and pixel tensors.

The processor is the checkpoint's own when transformers can build it (`AutoProcessor`). transformers cannot build a
Gemma 4 processor without torchvision (its video processor needs it), and DiffusionGemma reads neither video nor
audio, so otherwise Press builds transformers' `Gemma4Processor` with only its image side: the checkpoint's image
processor (`AutoImageProcessor`, Pillow backend) and tokenizer, and `image_seq_length` from its processor config.
The prompt layout (the expansion of each placeholder into <|image> + soft tokens + <image|>) stays transformers'.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from engine.images import ImageInputError, PromptImages

log = logging.getLogger("press.server")


def _image_text_processor_class():
    from transformers import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextGemma4Processor(Gemma4Processor):
        """transformers' Gemma4Processor with its image side only (no audio feature extractor, no video processor)."""

        def __init__(self, image_processor, tokenizer, chat_template=None, image_seq_length: int = 280, **kwargs):
            self.image_seq_length = image_seq_length
            self.image_token_id = tokenizer.image_token_id
            self.image_token = tokenizer.image_token
            self.boi_token = tokenizer.boi_token
            self.eoi_token = tokenizer.eoi_token
            self.audio_token = self.audio_token_id = self.boa_token = self.eoa_token = None
            self.video_token = self.video_token_id = None
            ProcessorMixin.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_template, **kwargs)  # fmt: skip

        def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
            if videos is not None or audio is not None:
                raise ValueError("this processor takes text and images only")
            ProcessorMixin.validate_inputs(self, images=images, text=text, **kwargs)
            if text is not None and images is not None:
                in_text = [sample.count(self.image_token) for sample in text]
                given = [len(sample) for sample in images]
                if in_text != given:
                    raise ValueError(f"the prompt has {in_text} image placeholders for {given} images")

    return ImageTextGemma4Processor


def _image_processor(path: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except ImportError:  # transformers releases (5.17) whose auto class needs torchvision even for Pillow processors
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        return Gemma4ImageProcessorPil.from_pretrained(path)


class NoImages(Exception):
    """Why this checkpoint reads no images on this server (said in the 400 an image part gets)."""


def load_processor(path: str, tokenizer, config):
    """The processor that prepares images for this checkpoint; raises NoImages saying why there is none."""
    if getattr(config, "vision_config", None) is None:
        raise NoImages("it has no vision tower")
    if getattr(tokenizer, "image_token", None) is None:
        raise NoImages("its tokenizer has no image tokens")
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        if getattr(processor, "image_processor", None) is not None and hasattr(processor, "image_token"):
            log.info("images: the checkpoint's processor (%s)", type(processor).__name__)
            return processor
    except Exception as exc:  # e.g. no torchvision for its video processor
        log.debug("AutoProcessor failed (%s); building the image side only", exc)
    try:
        image_processor = _image_processor(path)
    except OSError as exc:  # no preprocessor_config.json: the checkpoint was not made to read images
        log.info("images: no image processor in %s (%s); image parts will be refused", path, exc)
        raise NoImages("the checkpoint has no image processor (preprocessor_config.json)") from exc
    except Exception as exc:
        log.warning("images: the image processor of %s could not be loaded: %s", path, exc)
        raise NoImages(f"its image processor could not be loaded on this server ({type(exc).__name__})") from exc
    kwargs = {}
    processor_config = Path(path) / "processor_config.json"
    if processor_config.exists():
        saved = json.loads(processor_config.read_text())
        if "image_seq_length" in saved:
            kwargs["image_seq_length"] = saved["image_seq_length"]
    try:
        processor_class = _image_text_processor_class()
    except ImportError as exc:  # transformers 5.17 imports torchvision with its Gemma 4 processor
        log.warning("images: transformers cannot build a Gemma 4 processor here (%s); image parts will be refused", exc)
        raise NoImages("this server's transformers cannot build its processor without torchvision") from exc
    processor = processor_class(image_processor, tokenizer, chat_template=tokenizer.chat_template, **kwargs)
    log.info("images: Gemma 4 processor, image side only (%s)", type(image_processor).__name__)
    return processor


class VisionPrompt:
    """A rendered chat prompt and its images -> token ids and the engine's PromptImages."""

    def __init__(self, processor, image_token_id: int) -> None:
        self.processor = processor
        self.image_token_id = image_token_id

    def encode(self, text: str, images: list) -> tuple[list[int], PromptImages]:
        """Raises ImageInputError when the processor refuses the images or they do not fit the prompt."""
        try:
            out = self.processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
        except (ValueError, TypeError, OSError) as exc:
            raise ImageInputError(str(exc)) from exc
        ids = out["input_ids"][0].tolist()
        pixel_values = out["pixel_values"]
        position_ids = out.get("image_position_ids")
        if position_ids is None:
            raise ImageInputError("the processor gave no image_position_ids")
        images_in = PromptImages.build(ids, self.image_token_id, pixel_values.to(torch.float32), position_ids)
        return ids, images_in


def vision_prompt(engine) -> VisionPrompt | str:
    """The engine's model's image side, or why it reads no images."""
    loaded = engine.loaded
    try:
        processor = load_processor(loaded.path, loaded.tokenizer, loaded.model.config)
    except NoImages as exc:
        return str(exc)
    return VisionPrompt(processor, loaded.model.config.image_token_id)
