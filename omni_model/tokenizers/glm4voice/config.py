"""Reading the decoder folder's `config.yaml` without running it.

The released `glm-4-voice-decoder/config.yaml` is HyperPyYAML: tags such as
`!new:cosyvoice.flow.flow.MaskedDiffWithXvec` *construct Python objects* when the file is
loaded by the original code, and `!apply:` calls functions (it seeds the global RNGs).
Loading it that way would mean importing the original repository and executing whatever
a file says. We parse it with PyYAML's safe loader instead, turn each tag into a plain
record (class name + arguments), resolve `!ref <key>` references, and then read only
the two sections the decoder needs, `flow` and `hift`, checking every class and option
against what this implementation supports. Anything else in the file (data pipelines,
training options) is ignored; anything in those two sections we cannot interpret is a
`ValueError` that names it.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from omni_model.tokenizers.glm4voice.conformer import EncoderConfig
from omni_model.tokenizers.glm4voice.estimator import EstimatorConfig
from omni_model.tokenizers.glm4voice.flow import FlowConfig
from omni_model.tokenizers.glm4voice.hift import HiFTConfig


@dataclass(frozen=True)
class Tagged:
    """A `!new:`/`!apply:`/`!name:` node: the dotted target and its arguments."""

    kind: str
    target: str
    args: Any


@dataclass(frozen=True)
class _Ref:
    expression: str


class _Loader(yaml.SafeLoader):
    """Safe YAML plus HyperPyYAML's tags as inert records."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node, kind: str) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        args: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    else:
        args = loader.construct_scalar(node) or None
    return Tagged(kind, suffix, args)


for _kind in ("new", "apply", "name", "include"):
    _Loader.add_multi_constructor(f"!{_kind}:", lambda l, s, n, k=_kind: _tagged(l, s, n, k))
_Loader.add_constructor("!ref", lambda l, n: _Ref(l.construct_scalar(n)))
_Loader.add_constructor("!copy", lambda l, n: _Ref(l.construct_scalar(n)))
_Loader.add_constructor("!tuple", lambda l, n: tuple(l.construct_sequence(n, deep=True)))
_Loader.add_constructor("!PLACEHOLDER", lambda l, n: None)
# any other tag (a later HyperPyYAML's, or a section of the file we never read) stays inert
_Loader.add_multi_constructor("!", lambda l, s, n: _tagged(l, s, n, "other"))


_REF = re.compile(r"<([^<>]+)>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arithmetic(text: str) -> Any:
    """Evaluate `2 * 3.5 // 1`-style arithmetic (numbers and + - * / // ** only)."""
    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"config.yaml: cannot evaluate reference expression {text!r}")
    return walk(ast.parse(text, mode="eval"))


def _lookup(root: dict, path: str) -> Any:
    node: Any = root
    for part in re.split(r"[.\[\]]+", path.strip()):
        if not part:
            continue
        if isinstance(node, Tagged):
            node = node.args
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"config.yaml: !ref <{path}> names nothing in the file")
        node = node[part]
    return node


def _resolve(node: Any, root: dict, depth: int = 0) -> Any:
    if depth > 50:
        raise ValueError("config.yaml: references nest too deeply (a cycle?)")
    if isinstance(node, _Ref):
        text = node.expression.strip()
        whole = _REF.fullmatch(text)
        if whole:
            return _resolve(_lookup(root, whole.group(1)), root, depth + 1)
        values = {m: _resolve(_lookup(root, m), root, depth + 1) for m in _REF.findall(text)}
        return _arithmetic(_REF.sub(lambda m: repr(values[m.group(1)]), text))
    if isinstance(node, Tagged):
        return Tagged(node.kind, node.target, _resolve(node.args, root, depth + 1))
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth + 1) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_resolve(v, root, depth + 1) for v in node)
    return node


def read_yaml(path: Path, sections: tuple[str, ...] = ("flow", "hift")) -> dict:
    """The file's `sections` as plain data: tags become `Tagged` records and references
    are resolved within them (the rest of the file, training and data settings in the
    released one, is neither resolved nor checked)."""
    try:
        root = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(root, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    for section in sections:
        if section not in root:
            raise ValueError(f"{path}: no `{section}:` section")
    return {section: _resolve(root[section], root) for section in sections}


def _instance(node: Any, where: str, class_name: str) -> dict:
    """The keyword arguments of a `!new:...ClassName` node, or a clear error."""
    if not isinstance(node, Tagged) or node.kind != "new":
        raise ValueError(f"config.yaml: {where} should be `!new:...{class_name}`, got {node!r}")
    if node.target.rsplit(".", 1)[-1] != class_name:
        raise ValueError(f"config.yaml: {where} is {node.target}; this decoder implements "
                         f"{class_name} only")
    if node.args is None:
        return {}
    if not isinstance(node.args, dict):
        raise ValueError(f"config.yaml: {where} ({class_name}) needs keyword arguments")
    return dict(node.args)


def _take(kwargs: dict, where: str, accepted: dict[str, Any], ignored: tuple[str, ...] = ()) -> dict:
    """Check kwargs against the options we implement: `accepted` maps name -> the only value
    we support (None: any value is fine and is returned)."""
    out = {}
    for key, value in kwargs.items():
        if key in ignored:
            continue
        if key not in accepted:
            raise ValueError(f"config.yaml: {where} has option {key!r}, which this decoder "
                             "does not implement")
        required = accepted[key]
        if required is not None and value != required:
            raise ValueError(f"config.yaml: {where}.{key} = {value!r} is not supported "
                             f"(only {required!r})")
        out[key] = value
    return out


def _fields(cls: type, values: dict) -> dict:
    """The values `cls` has fields for; lists become tuples, and numbers PyYAML reads as text
    (YAML 1.1 takes `1e-06` for a string; HyperPyYAML's loader for a float) become numbers."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in types:
            continue
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, str) and types[key] in ("float", "int"):
            try:
                value = float(value) if types[key] == "float" else int(value)
            except ValueError as err:
                raise ValueError(f"config.yaml: {key} = {value!r} is not a number") from err
        out[key] = value
    return out


def _encoder_config(node: Any) -> EncoderConfig:
    where = "flow.encoder"
    kw = _take(_instance(node, where, "BlockConformerEncoder"), where, {
        "input_size": None, "output_size": None, "attention_heads": None, "linear_units": None,
        "num_blocks": None, "block_size": None, "normalize_before": None, "macaron_style": None,
        "key_bias": None, "activation_type": None,
        "input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "block_rel_selfattn", "use_cnn_module": False,
        "static_chunk_size": 0, "use_dynamic_chunk": False, "global_cmvn": None,
        "use_dynamic_left_chunk": False, "positionwise_conv_kernel_size": 1,
        "causal": None, "cnn_module_kernel": None, "cnn_module_norm": None,
        "gradient_checkpointing": None,
    }, ignored=("dropout_rate", "positional_dropout_rate", "attention_dropout_rate"))
    if kw.get("global_cmvn") is not None:
        raise ValueError("config.yaml: flow.encoder.global_cmvn is not supported")
    if kw.get("activation_type", "swish") not in ("swish", "relu", "gelu", "tanh"):
        raise ValueError(f"config.yaml: flow.encoder.activation_type {kw['activation_type']!r} "
                         "is not supported")
    return EncoderConfig(**_fields(EncoderConfig, kw))


def _flow_config(node: Any) -> FlowConfig:
    kw = _take(_instance(node, "flow", "MaskedDiffWithXvec"), "flow", {
        "input_size": None, "output_size": None, "spk_embed_dim": None, "vocab_size": None,
        "input_frame_rate": None, "output_type": "mel", "encoder": None,
        "length_regulator": None, "decoder": None,
    }, ignored=("only_mask_loss", "decoder_conf", "mel_feat_conf"))
    for part in ("encoder", "length_regulator", "decoder"):
        if part not in kw:
            raise ValueError(f"config.yaml: flow has no {part}")
    reg = _take(_instance(kw.pop("length_regulator"), "flow.length_regulator", "InterpolateRegulator"),
                "flow.length_regulator", {"channels": None, "sampling_ratios": None,
                                          "out_channels": None, "groups": None})
    cfm = _take(_instance(kw.pop("decoder"), "flow.decoder", "ConditionalCFM"), "flow.decoder",
                {"in_channels": None, "n_spks": None, "spk_emb_dim": None, "cfm_params": None,
                 "estimator": None})
    params = cfm.get("cfm_params")
    if isinstance(params, Tagged):  # `!new:omegaconf.DictConfig {content: {...}}`
        params = (params.args or {}).get("content", params.args)
    params = _take(dict(params or {}), "flow.decoder.cfm_params", {
        "sigma_min": None, "solver": "euler", "t_scheduler": None, "inference_cfg_rate": None,
    }, ignored=("training_cfg_rate", "reg_loss_type"))
    est = _take(_instance(cfm.get("estimator"), "flow.decoder.estimator", "ConditionalDecoder"),
                "flow.decoder.estimator", {
                    "in_channels": None, "out_channels": None, "channels": None, "attention_head_dim": None,
                    "n_blocks": None, "num_mid_blocks": None, "num_heads": None, "act_fn": None,
                }, ignored=("dropout",))
    output_size = int(kw.get("output_size", 80))
    if reg.get("channels", output_size) != output_size or reg.get("out_channels") not in (None, output_size):
        raise ValueError("config.yaml: flow.length_regulator must keep flow.output_size channels")
    estimator = EstimatorConfig(**_fields(EstimatorConfig, est))
    expected = 3 * output_size + int(cfm.get("spk_emb_dim", 80))
    if estimator.in_channels != expected or estimator.out_channels != output_size:
        raise ValueError(f"config.yaml: the estimator takes {estimator.in_channels} channels and "
                         f"gives {estimator.out_channels}; x, mu, cond ({output_size} each) and the "
                         f"speaker vector make {expected} in and {output_size} out")
    if int(cfm.get("spk_emb_dim", 80)) != output_size:
        raise ValueError("config.yaml: flow.decoder.spk_emb_dim must equal flow.output_size "
                         "(the speaker vector is projected to output_size)")
    return FlowConfig(
        **_fields(FlowConfig, {k: v for k, v in kw.items() if k != "encoder"}),
        encoder=_encoder_config(kw["encoder"]),
        sampling_ratios=tuple(reg.get("sampling_ratios", (1, 1, 1, 1))),
        regulator_groups=int(reg.get("groups", 1)),
        cfm_in_channels=int(cfm.get("in_channels", 240)),
        n_spks=int(cfm.get("n_spks", 1)),
        spk_emb_dim=int(cfm.get("spk_emb_dim", 80)),
        **_fields(FlowConfig, params),
        estimator=estimator,
    )


def _hift_config(node: Any) -> HiFTConfig:
    kw = _instance(node, "hift", "HiFTGenerator")
    if "f0_predictor" in kw:
        kw["f0_predictor"] = _instance(kw["f0_predictor"], "hift.f0_predictor", "ConvRNNF0Predictor")
    return HiFTConfig.from_section(kw)


@dataclass(frozen=True)
class DecoderConfig:
    """What `config.yaml` says about the two models of the decoder."""

    flow: FlowConfig
    hift: HiFTConfig


def load_decoder_config(folder: str | Path) -> DecoderConfig:
    """Parse `folder/config.yaml` (a `glm-4-voice-decoder` folder) without executing it."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.yaml (a GLM-4-Voice decoder folder holds "
                                "config.yaml, flow.pt and hift.pt)")
    root = read_yaml(path)
    return DecoderConfig(flow=_flow_config(root["flow"]), hift=_hift_config(root["hift"]))
