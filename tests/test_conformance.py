"""Conformance: transformers' own shared tests (ModelTesterMixin, ConfigTester, ProcessorTesterMixin) run against
Florence-VL as transformers runs them against its native VLMs.

The test files are those of the installed transformers version, taken from its source distribution by
scripts/fetch_common_tests.sh (scripts/test.sh runs it); none is copied into this repository. That distribution does
not ship tests/generation/, so GenerationTesterMixin is not among them (tests/test_generation.py covers `generate`).
Each skip below names its reason.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import unittest
from unittest import mock

import torch
import transformers

from conftest import ROOT, tiny_processor

from florence_vl.compatibility_florence_vl import IS_TRANSFORMERS_4
from florence_vl.configuration_florence_vl import FlorenceVLConfig
from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration, FlorenceVLModel
from florence_vl.processing_florence_vl import FlorenceVLProcessor

COMMON_TESTS = ROOT / ".cache" / "transformers-tests" / transformers.__version__
if not (COMMON_TESTS / "transformers_common_tests" / "test_modeling_common.py").is_file():
    raise RuntimeError(
        f"transformers {transformers.__version__}'s common test files are missing from {COMMON_TESTS}: run "
        f"scripts/fetch_common_tests.sh {sys.executable}"
    )
sys.path.insert(0, str(COMMON_TESTS))

from transformers_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402
from transformers_common_tests.test_processing_common import ProcessorTesterMixin  # noqa: E402



def skipped(reason: str):
    """A test method that skips with `reason`: replaces one inherited test (or one parameterized case) exactly."""

    @unittest.skip(reason)
    def test(self) -> None:
        pass

    return test


class FlorenceVLModelTester:
    """A tiny Florence-VL (2-stage DaViT on 16x16 images: 2x2 grid + 1 global token; 1-layer BART; 2-layer Llama)
    and its inputs, in the form the common tests expect (`prepare_config_and_inputs_for_common`)."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 3, text_length: int = 7):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = True
        self.image_size = 16
        self.num_image_tokens = 5
        self.seq_length = text_length + self.num_image_tokens
        self.image_token_id = 3
        self.vision_config = dict(
            depths=[1, 1], embed_dim=[8, 16], num_heads=[1, 2], num_groups=[1, 2], patch_size=[4, 3],
            patch_stride=[4, 2], patch_padding=[0, 1], patch_prenorm=[False, True], window_size=2,
            projection_dim=16, drop_path_rate=0.0,
        )
        self.breadth_encoder_config = dict(
            vocab_size=99, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_layers=0, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        )
        self.text_config = dict(
            model_type="llama", vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1,
            bos_token_id=0, eos_token_id=2,
        )
        self.prompts = {
            "<CAPTION>": {"text": "a", "input_ids": [0, 5, 6, 2]},
            "<OCR>": {"text": "b", "input_ids": [0, 7, 2, 1]},
        }
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.hidden_size = self.text_config["hidden_size"]
        self.vocab_size = self.text_config["vocab_size"]

    def get_config(self) -> FlorenceVLConfig:
        return FlorenceVLConfig(
            vision_config=self.vision_config,
            breadth_encoder_config=self.breadth_encoder_config,
            text_config=self.text_config,
            florence_prompts=self.prompts,
            image_token_id=self.image_token_id,
            image_seq_length=self.num_image_tokens,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[FlorenceVLConfig, dict[str, torch.Tensor]]:
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        # Text ids above the image and special ids; one image's placeholders first, as a chat prompt puts them.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        attention_mask = torch.ones_like(input_ids)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def registered_as_native() -> contextlib.ExitStack:
    """Our classes in transformers' Auto tables for the duration, as a native model's are: the common tests tell the
    base model from the generation model by these tables (remote code is otherwise never registered)."""
    from transformers.models.auto import modeling_auto

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {"florence_vl": "FlorenceVLModel"}))
    stack.enter_context(mock.patch.dict(
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, {"florence_vl": "FlorenceVLForConditionalGeneration"}
    ))
    stack.enter_context(mock.patch.dict(modeling_auto.MODEL_MAPPING._extra_content, {FlorenceVLConfig: FlorenceVLModel}))
    return stack


class FlorenceVLModelTest(ModelTesterMixin, unittest.TestCase):
    """transformers' ModelTesterMixin and ConfigTester on the bare model and the generation model."""

    all_model_classes = (FlorenceVLModel, FlorenceVLForConditionalGeneration)
    _is_composite = True
    # transformers 4.x flags (5.x dropped both features): Llama's attention has no head pruning or head masks.
    test_pruning = False
    test_head_masking = False

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.native = registered_as_native()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.native.close()
        super().tearDownClass()

    def setUp(self) -> None:
        self.model_tester = FlorenceVLModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=FlorenceVLConfig, has_text_modality=False,
            common_properties=["image_token_id", "image_seq_length"],
        )

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    # get_image_features reports the DaViT tower's hidden states (its input and each block's output) and
    # attentions (each block has a window- and a channel-attention), as Florence-2 does.
    def _image_features_get_expected_num_attentions(self, model_tester=None) -> int:
        return 2 * sum(self.model_tester.vision_config["depths"])

    def _image_features_get_expected_num_hidden_states(self, model_tester=None) -> int:
        return sum(self.model_tester.vision_config["depths"]) + 1

    test_generation_tester_mixin_inheritance = skipped(
        "GenerationTesterMixin is not in transformers' source distribution (tests/generation/ is not shipped); "
        "tests/test_generation.py tests generate")


TOO_SHORT = ("transformers 4.57's test file hard-codes max_length 76 to 117, shorter than one image's 577 tokens "
             "(5.x takes the lengths from the test class, and passes)")


class FlorenceVLProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """transformers' ProcessorTesterMixin on the processor with the fixture's Llama-3 tokenizer and chat template."""

    processor_class = FlorenceVLProcessor
    # Each image is 577 tokens: the max_length cases of the kwargs tests must leave room for one.
    images_text_kwargs_max_length = 600
    images_text_kwargs_override_max_length = 595
    images_unstructured_max_length = 620

    # Deliberate deviations, each skipped exactly (parameterized names included) and tested in test_processor.py.
    test_processor_from_and_save_pretrained = test_processor_from_and_save_pretrained_as_nested_dict = skipped(
        "remote code: save_pretrained gives the processor the `auto_map` that AutoProcessor needs to find this class, "
        "which a reloaded copy does not hold (native processors have none); test_processor.py checks the saved folder "
        "and the reloaded processor")

    if IS_TRANSFORMERS_4:  # 5.x reads the lengths from the attributes above; 4.57's test bodies hard-code them
        test_kwargs_overrides_default_tokenizer_kwargs = test_structured_kwargs_nested = skipped(TOO_SHORT)
        test_structured_kwargs_nested_from_dict = test_tokenizer_defaults_preserved_by_kwargs = skipped(TOO_SHORT)
        test_unstructured_kwargs = test_unstructured_kwargs_batched = skipped(TOO_SHORT)

    # transformers 5.x builds the processor from these hooks (setUpClass); 4.x loads its parts from `tmpdirname`.
    @classmethod
    def _setup_tokenizer(cls):
        return tiny_processor("llama").tokenizer

    @classmethod
    def _setup_image_processor(cls):
        return tiny_processor("llama").image_processor

    @staticmethod
    def prepare_processor_dict() -> dict:
        processor = tiny_processor("llama")
        return {"chat_template": processor.chat_template, "image_token": processor.image_token}

    def setUp(self) -> None:
        if IS_TRANSFORMERS_4:
            self.tmpdirname = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, self.tmpdirname)
            processor = tiny_processor("llama")
            processor.save_pretrained(self.tmpdirname)
            self.image_token = processor.image_token
