"""A `--torch-model` file, as a user of the from-scratch DeepSeek-V3 would write one: build the
model from its config and state dict, run it, name its blocks. Here the model is remap's reference
(written from the upstream model's facts); a user passes their own code the same way."""

from remap.parity.scratch_model import ScratchModel


def build(config, state_dict):
    model = ScratchModel(config)
    model.load_state_dict(state_dict, strict=True)
    return model


def forward(model, input_ids):
    return model(input_ids).logits


def layers(model):
    return list(model.h)
