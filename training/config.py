"""The param-file schema: every key the training script accepts, checked before any data is touched.

A param file is a JSON object. ``method`` names the Table 2 row; it picks a model and a loss weighting
(``METHODS``), which ``model`` / ``weighting`` may override to pair any weighting with any multi-branch
model. ``dataset`` picks the data set (paper §4.1) and with it the default backbone and input size; on a
larger backbone (CLEVR, CELEB-A, CUB-200) the method's model is its ``backbone_*`` counterpart (``ON_BACKBONE``).
Every problem is reported as one ``ParamError`` line naming the file, the key and what is allowed.
"""
import difflib
import inspect
import json
from pathlib import Path

import torch

from loaders import LOADERS, NUM_TASKS, SETTINGS
from loaders.clevr import RULES
from loaders.multi_mnist import LAYOUT_CHOICES, RESIZES
from models import BACKBONE_OPTIONS, LOCATION_HEAD_MODELS, MODELS, ON_BACKBONE, TD_MAP_MODELS
from models.backbones import BACKBONES, build_backbone
from models.gumbel_matrix import ROUTER_OPTIONS, router_parameters
from models.lenet import DROPOUTS
from weighting import WEIGHTINGS, build_weighting

# method -> (model, weighting); weighting None = single-branch training, one task drawn per sample.
METHODS = {
    "single_task": ("single_task", "sum"),
    "uniform_scaling": ("multi_branch", "uniform"),
    "gradnorm": ("multi_branch", "gradnorm"),
    "kendall": ("multi_branch", "kendall"),
    "mgda": ("multi_branch", "mgda"),
    "task_routing": ("task_routing", None),
    "ch_mod": ("ch_mod", None),
    "ch_mod_extended": ("ch_mod_extended", None),
    "controlnet": ("controlnet", None),
    "td_only": ("td_only", None),  # Table 6b ablations: ControlNet without BU1 / without TD
    "bu_only": ("bu_only", None),
    "gumbel_matrix": ("gumbel_matrix", "uniform"),  # learned parameter allocation (Maziarz et al.), not in the paper
    # weightings published after the paper, on the multi-branch LeNet (docs/weightings.md)
    **{name: ("multi_branch", name) for name in ("dwa", "rlw", "pcgrad", "cagrad", "imtl", "nash_mtl", "aligned_mtl",
                                                  "famo")},
}

OPTIMIZERS = ("Adam", "SGD", "RMSprop")
PROTOCOLS = ("held_out", "authors")
LR_SCHEDULES = ("halve_30_60_90", "none")

# key: (type, default (REQUIRED = must be given), allowed values or (min, max) range or None, meaning)
REQUIRED = object()
SCHEMA = {
    "exp_id": (str, REQUIRED, None, "experiment name; default output dir is runs/<exp_id>/seed<k>"),
    "method": (str, REQUIRED, tuple(METHODS), "row of Tables 2, 3 and 6a; picks the model (on a larger backbone its backbone_* counterpart) and the loss weighting"),
    "setting": (str, REQUIRED, SETTINGS, "task set of the data set: a Multi-MNIST generator kind, clevr_<number of "
                "tasks> (clevr, clevr_like), celeba or cub"),
    "dataset": (str, "multi_mnist", tuple(LOADERS), "data set (paper §4.1; clevr_like: CLEVR-like scenes generated "
                "offline, loaders/clevr_like.py)"),
    "model": (str, None, tuple(MODELS), "override the method's model"),
    "weighting": (str, None, tuple(WEIGHTINGS), "override the method's loss weighting (multi-branch models only)"),
    "model_options": (dict, {}, None, "keyword arguments of the model: c1/c2 widths; gated (ch_mod, "
                      "ch_mod_extended, task_routing: comma list of conv1, conv2, pool2); sigma or units_off, tied_masks, "
                      "mask_gradient (task_routing); docs/fidelity.md §6"),
    "weighting_options": (dict, {}, None, "keyword arguments of the weighting (e.g. alpha for gradnorm)"),
    "router_options": (dict, {}, None, "training of learned allocations (gumbel_matrix): " +
                       ", ".join(f"{k} (default {v[0]})" for k, v in ROUTER_OPTIONS.items())),
    "epochs": (int, 100, (1, 100_000), "training epochs (the CLI --epochs overrides it)"),
    "optimizer": (str, "Adam", OPTIMIZERS, "optimiser (paper Table 1: Adam)"),
    "lr": (float, 1e-3, (1e-8, 10.0), "initial learning rate (paper Table 1: 1e-3)"),
    "momentum": (float, 0.9, (0.0, 0.999), "SGD momentum (SGD only)"),
    "lr_schedule": (str, "halve_30_60_90", LR_SCHEDULES, "the authors' lr halving at 30/60/90% of the epochs, or none"),
    "batch_size": (int, 512, (1, 1_000_000), "training batch size (paper Table 1: 512)"),
    "eval_batch_size": (int, 0, (0, 10_000_000), "image-task pairs per evaluation pass; 0 = auto (512 on CPU and for the larger backbones, 32768 for LeNet on GPU)"),
    "tf32": (bool, False, None, "allow TensorFloat-32 in CUDA float32 convolutions and matmuls (faster on Ampere and "
             "later, a 10-bit mantissa in the products); false = IEEE float32, as on CPU (runtime/precision.py); "
             "nothing changes on CPU"),
    "memory_format": (str, "channels_last", ("channels_last", "contiguous"), "conv memory layout (same maths; channels_last is ~2x faster on CPU)"),
    "resize": (str, "nearest", RESIZES, "Multi-MNIST resize 52 -> 28 (and 36, 40 -> 28): Pillow's NEAREST (Sener & "
               "Koltun's imresize), BICUBIC clipped to 0..255, or BICUBIC with the uint8 wrap-around of the authors' "
               "generator under Pillow >= 7 (loaders/multi_mnist.py)"),
    "layout": (str, "diagonal", LAYOUT_CHOICES, "2-digit Multi-MNIST images: diagonal (Sener & Koltun's, 36x36, "
               "offsets (0,0) and (6,6)) or side_by_side (a 2x1 grid like the 4- and 9-digit ones: 40x40, columns 0 and "
               "12; loaders/multi_mnist.py, docs/fidelity.md)"),
    "protocol": (str, "held_out", PROTOCOLS, "held_out: train on MNIST train[:50k], keep the best-validation epoch "
                 "(validation on train[50k:]); authors: the authors' released script, train on all 60k, evaluate the "
                 "test split every epoch and keep the best-on-test model (optimistic; multi_mnist only). Every run "
                 "also reports the best-test and last-epoch figures (docs/fidelity.md)"),
    "dropout": (str, "none", DROPOUTS, "none, or sener_koltun: Sener & Koltun's LeNet dropout in the multi-branch and "
                "single-task LeNets (one channel mask for the batch on conv2, per-element masks on the heads' fc1, no "
                "rescale, none at eval; models/lenet.py)"),
    "data_seed": (int, 0, (0, 2**31 - 1), "seed of the data: the Multi-MNIST and CLEVR-like generation and the held-out validation split (the same data for every run seed)"),
    "data_root": (str, None, None, "data directory (--data_root overrides it); null = $MTL_DATA_ROOT or ./data (multi_mnist, clevr_like), $MTL_CLEVR_ROOT, $MTL_CELEBA_ROOT or $MTL_CUB_ROOT (the unpacked data set)"),
    "backbone": (str, None, ("lenet",) + tuple(BACKBONES), "BU backbone (paper §4.2); null = the data set's: lenet (multi_mnist), vgg11_clevr (clevr, clevr_like), vgg7 (celeba), resnet18 (cub)"),
    "input_size": (int, 0, (0, 4096), "side S of the square model input (images resized to S x S); 0 = the data set's: 28 (multi_mnist, the only choice), 224 (clevr, cub), 64 (celeba, clevr_like)"),
    "spatial_loss_weight": (float, 0.0, (0.0, 1000.0), "weight of the localisation loss ('loc' in Tables 3 and 6a, paper §4.2): ControlNet's loss on the map at the bottom of TD (multi_mnist, clevr, clevr_like, cub); the baselines' FC regression of (x, y) at the top of the network (ch_mod, task_routing and multi-branch models with weighting uniform, sum or kendall, on clevr, clevr_like, cub); 0 = off"),
    "eval_every": (int, 1, (1, 100_000), "evaluate val and test every k epochs and after the last (the best epoch is chosen among those; for large task sets)"),
    "val_fraction": (float, 0.1, (0.0, 0.5), "share of the training split held out for validation (clevr, clevr_like, cub)"),
    "relation_rule": (str, "pixel_cone", RULES, "CLEVR relations: the authors' cones in the image or CLEVR's own scene relationships (loaders/clevr.py)"),
    "clevr_like_train": (int, 4000, (1, 10_000_000), "clevr_like: scenes generated as CLEVR's train split (train and val)"),
    "clevr_like_test": (int, 1000, (1, 10_000_000), "clevr_like: scenes generated as CLEVR's val split (the test split)"),
}


class ParamError(ValueError):
    """A user mistake in a param file or on the command line: printed as one line, exit code 2."""


def load_params(path, overrides=(), raw=None, options=None):
    """Reads the param file at ``path`` (or takes its JSON object ``raw``, when the caller has read it), applies the
    ``--set KEY=VALUE`` ``overrides``, validates and completes it; raises ParamError on any problem, also when
    ``overrides`` and a command-line option that sets a key (``options``: key -> value, None when not given) give
    that key two values."""
    raw = apply_overrides(read_param_file(path) if raw is None else raw, overrides)
    params = validate(raw, str(Path(path)) + (" with --set " + " ".join(overrides) if overrides else ""))
    check_option_overrides(overrides, options or {})
    return params


def apply_overrides(raw, overrides, schema=SCHEMA):
    """``raw`` with each ``KEY=VALUE`` of ``overrides`` set: VALUE is read as JSON (0.01, true, null, "x", {...}),
    else taken as a string; a dotted KEY sets one entry of a dict-valued key (``weighting_options.alpha=1.0``).
    Each value is checked by the schema like a param file's; ParamError (one line naming --set) otherwise."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    given = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ParamError(f"--set {item}: expected KEY=VALUE (e.g. --set lr=0.01 or "
                             f"--set weighting_options.alpha=1.0)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if given.setdefault(key, value) != value:
            raise ParamError(f"--set {key} is given twice with different values ({json.dumps(given[key])} and "
                             f"{json.dumps(value)}); pass it once")
        top, dot, entry = key.partition(".")
        if top not in schema:
            close = difflib.get_close_matches(top, schema, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ParamError(f"--set {item}: unknown key '{top}'; {hint}valid keys: {', '.join(schema)}")
        if dot:
            if schema[top][0] is not dict or not entry:
                dicts = [name for name, entry in schema.items() if entry[0] is dict]
                raise ParamError(f"--set {item}: only dict keys take a dotted entry; allowed: "
                                 f"{', '.join(name + '.NAME' for name in dicts)}")
            current = raw.get(top) or {}
            if not isinstance(current, dict):
                raise ParamError(f"--set {item}: key '{top}' is not a JSON object in the param file")
            raw[top] = {**current, entry: value}
        else:
            raw[top] = check_value(top, value, f"--set {item}", schema)
    return raw


def check_option_overrides(overrides, options):
    """ParamError (one line) when ``--set KEY=VALUE`` and the command-line option ``--KEY`` (``options``: key ->
    value, None when not given) give a key two different values."""
    given = apply_overrides({}, overrides)
    for key, value in options.items():
        if value is not None and key in given and given[key] != value:
            raise ParamError(f"--set {key}={json.dumps(given[key])} and --{key} {value} give '{key}' two values; "
                             f"pass one of them")


def load_checked(path, schema):
    """A param file of another protocol or experiment (Maziarz et al.'s round robin, Table 5, the task clusters),
    whose keys ``schema`` declares in this module's form: read and checked by this module's checker, the missing
    keys filled with their defaults; ParamError (one line) otherwise."""
    return check_keys(read_param_file(path, required_keys(schema)), str(Path(path)), schema)


def read_param_file(path, required=None):
    """The JSON object of a param file (any script's); ParamError, one line naming the file, on any problem (an empty
    file: naming the ``required`` keys, by default this schema's)."""
    path = Path(path)
    required = required_keys() if required is None else required
    if not path.is_file():
        raise ParamError(f"{path}: param file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ParamError(f"{path}: not UTF-8 text (byte {err.start}); save the param file as UTF-8 JSON") from None
    if not text.strip():
        raise ParamError(f"{path}: param file is empty; expected a JSON object with keys {', '.join(required)}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ParamError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: expected a JSON object at the top level, got {type(raw).__name__}")
    return raw


def validate(raw, source):
    params = check_keys(raw, source)
    _complete_data(params, source)
    model, weighting = METHODS[params["method"]]
    params["model"] = params["model"] or _model_on_backbone(model, params, source)
    params["weighting"] = params["weighting"] or weighting
    _check_pairing(params, source)
    model = _check_options(params, source)
    _check_spatial_loss(params, source)
    params["router_options"] = _check_router_options(params, model, source)
    return params


def check_keys(raw, source, schema=SCHEMA):
    """Every key of ``raw`` known to ``schema`` (this script's, or another script's of the same form) and of the
    right type and range, the missing ones filled with their defaults; ParamError (one line) otherwise."""
    params = {}
    for key, value in raw.items():
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ParamError(f"{source}: unknown key '{key}'; {hint}valid keys: {', '.join(schema)}")
        params[key] = check_value(key, value, source, schema)
    for key, (_, default, _, meaning) in schema.items():
        if key not in params:
            if default is REQUIRED:
                raise ParamError(f"{source}: missing key '{key}' ({meaning}); allowed: {_allowed(key, schema)}")
            params[key] = default
    return params


def check_value(key, value, source, schema=SCHEMA):
    kind, default, allowed, _ = schema[key]
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ParamError(f"{source}: key '{key}' must be {kind.__name__}, got {json.dumps(value)}; "
                         f"allowed: {_allowed(key, schema)}")
    if kind is str and default is REQUIRED and not value:
        raise ParamError(f"{source}: key '{key}' is empty; allowed: {_allowed(key, schema)}")
    if isinstance(allowed, tuple) and allowed and isinstance(allowed[0], str) and value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ParamError(f"{source}: key '{key}' has unknown value {json.dumps(value)}{hint}; allowed: {', '.join(allowed)}")
    if isinstance(allowed, tuple) and len(allowed) == 2 and not isinstance(allowed[0], str):
        low, high = allowed
        if not low <= value <= high:
            raise ParamError(f"{source}: key '{key}' = {value} is out of range; allowed: {low} to {high}")
    return value


def _complete_data(params, source):
    """The data set's default backbone and input size, and the checks that tie the setting, the backbone, the
    input size and the protocol to the data set."""
    loader = LOADERS[params["dataset"]]
    if params["protocol"] != "held_out" and params["dataset"] != "multi_mnist":
        raise ParamError(f"{source}: key 'protocol': '{params['protocol']}' is the authors' Multi-MNIST protocol, not "
                         f"defined for data set '{params['dataset']}'; allowed: held_out")
    if params["layout"] != "diagonal" and (params["dataset"], params["setting"]) != ("multi_mnist", "2digits"):
        raise ParamError(f"{source}: key 'layout': '{params['layout']}' is a layout of the 2-digit Multi-MNIST images, "
                         f"not of setting '{params['setting']}'; allowed: diagonal")
    if params["setting"] not in loader.num_tasks:
        raise ParamError(f"{source}: key 'setting': '{params['setting']}' is not a task set of data set "
                         f"'{params['dataset']}'; allowed: {', '.join(loader.num_tasks)}")
    params["backbone"] = params["backbone"] or loader.backbone
    params["input_size"] = params["input_size"] or loader.input_size
    if (params["backbone"] == "lenet") != (loader.backbone == "lenet"):
        allowed = "lenet" if loader.backbone == "lenet" else ", ".join(BACKBONES)
        raise ParamError(f"{source}: key 'backbone': '{params['backbone']}' does not take the images of data set "
                         f"'{params['dataset']}'; allowed: {allowed}")
    if params["backbone"] == "lenet" and params["input_size"] != loader.input_size:
        raise ParamError(f"{source}: key 'input_size': LeNet takes {loader.input_size} x {loader.input_size} images; "
                         f"allowed: 0 or {loader.input_size}")
    if params["backbone"] != "lenet":
        try:
            with torch.device("meta"):
                build_backbone(params["backbone"], input_size=params["input_size"])
        except ValueError as err:
            raise ParamError(f"{source}: key 'input_size': {err}") from None


def _model_on_backbone(model, params, source):
    """The method's model on the param file's backbone: the LeNet model itself, or its ``backbone_*`` counterpart."""
    if params["backbone"] == "lenet":
        return model
    if model not in ON_BACKBONE:
        available = [method for method, (lenet_model, _) in METHODS.items() if lenet_model in ON_BACKBONE]
        raise ParamError(f"{source}: key 'method': '{params['method']}' is not implemented on backbone "
                         f"'{params['backbone']}'; allowed: {', '.join(available)}")
    return ON_BACKBONE[model]


def _check_spatial_loss(params, source):
    if params["spatial_loss_weight"] == 0:
        return
    if not LOADERS[params["dataset"]].has_locations:
        raise ParamError(f"{source}: key 'spatial_loss_weight': data set '{params['dataset']}' has no object or part "
                         f"locations to train it on; allowed: 0")
    located = TD_MAP_MODELS + LOCATION_HEAD_MODELS
    if params["model"] not in located:
        raise ParamError(f"{source}: key 'spatial_loss_weight': model '{params['model']}' has neither a TD map nor a "
                         f"location head to train (models: {', '.join(located)}); allowed: 0")
    weighting = params["weighting"]
    if weighting is not None and not WEIGHTINGS[weighting].combines_losses:
        allowed = [name for name, cls in WEIGHTINGS.items() if cls.combines_losses]
        raise ParamError(f"{source}: key 'spatial_loss_weight': weighting '{weighting}' combines the classification "
                         f"losses only; with a localisation loss use one of: {', '.join(allowed)} (or set 0)")


def backbone_kwargs(params):
    """The plain backbone of the param file (the unit of the paper's #P): its name and, on a larger backbone, the
    data set's classes, the input size and the model's width (``models.unit_counts``)."""
    if params["backbone"] == "lenet":
        return {"backbone": "lenet"}
    return {"backbone": params["backbone"], "num_classes": LOADERS[params["dataset"]].num_classes,
            "input_size": params["input_size"], "width": params["model_options"].get("width", 1.0)}


def model_kwargs(params):
    """The model's keyword arguments: ``model_options``, on a larger backbone with the backbone's name, the data
    set's classes and the input size, ``location_head`` when a baseline trains the localisation loss, and
    ``dropout`` when one is asked for."""
    extra = {"location_head": True} if params["spatial_loss_weight"] > 0 and params["model"] in LOCATION_HEAD_MODELS \
        else {}
    if params.get("dropout", "none") != "none":
        extra["dropout"] = params["dropout"]
    if params["backbone"] == "lenet":
        return {**params["model_options"], **extra}
    return {**backbone_kwargs(params), **params["model_options"], **extra}


def _check_pairing(params, source):
    paradigm = MODELS[params["model"]].paradigm
    if paradigm == "multi_branch" and params["weighting"] is None:
        raise ParamError(f"{source}: key 'weighting': model '{params['model']}' is multi-branch and needs a loss "
                         f"weighting; allowed: {', '.join(WEIGHTINGS)}")
    if paradigm == "single_branch" and params["weighting"] is not None:
        raise ParamError(f"{source}: key 'weighting': '{params['weighting']}' weights the losses of several branches, "
                         f"but model '{params['model']}' has a single branch (one task per sample); allowed: null")


def _check_options(params, source):
    """Builds the model (on the meta device: no memory, no data) and the weighting once, so that their own checks
    run now."""
    if (params["model"] in ON_BACKBONE.values()) != (params["backbone"] != "lenet"):
        allowed = ON_BACKBONE.values() if params["backbone"] != "lenet" else \
            [name for name in MODELS if name not in ON_BACKBONE.values()]
        raise ParamError(f"{source}: key 'model': '{params['model']}' does not run on backbone '{params['backbone']}' "
                         f"(data set '{params['dataset']}'); allowed: {', '.join(allowed)}")
    signature = inspect.signature(MODELS[params["model"]]).parameters
    if params["dropout"] != "none" and "dropout" not in signature:
        with_dropout = [name for name, cls in MODELS.items() if "dropout" in inspect.signature(cls).parameters]
        raise ParamError(f"{source}: key 'dropout': model '{params['model']}' has no Sener-Koltun dropout (models with "
                         f"it: {', '.join(with_dropout)}); allowed: none")
    valid = [name for name in signature if name not in ("num_tasks", "location_head", "dropout") + BACKBONE_OPTIONS]
    for name, value in params["model_options"].items():
        if name not in valid:
            raise ParamError(f"{source}: unknown key 'model_options.{name}' for model '{params['model']}'; "
                             f"allowed: {', '.join(valid) or 'none'}")
        _check_option_type(f"model_options.{name}", value, signature[name].default, source)
    if params["weighting"] is not None:
        signature = inspect.signature(WEIGHTINGS[params["weighting"]]).parameters
        for name, value in params["weighting_options"].items():
            if name in signature:
                _check_option_type(f"weighting_options.{name}", value, signature[name].default, source)
    if params["weighting"] is None and params["weighting_options"]:
        raise ParamError(f"{source}: key 'weighting_options' is set but method '{params['method']}' uses no "
                         f"loss weighting; allowed: {{}}")
    num_tasks = NUM_TASKS[params["setting"]]
    try:
        with torch.device("meta"):
            model = MODELS[params["model"]](num_tasks, **model_kwargs(params))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ParamError(f"{source}: key 'model_options': {err}") from None
    weighting = WEIGHTINGS.get(params["weighting"])
    if weighting is not None and weighting.needs_trunk and not hasattr(model, "trunk"):
        raise ParamError(f"{source}: key 'weighting': '{params['weighting']}' needs a shared trunk, which model "
                         f"'{params['model']}' does not have; allowed models: multi_branch")
    if params["weighting"] is not None:
        try:
            build_weighting(params["weighting"], num_tasks, params["weighting_options"])
        except (TypeError, ValueError) as err:
            raise ParamError(f"{source}: key 'weighting_options': {err}") from None
    return model


def _check_router_options(params, model, source):
    """``router_options`` completed with the defaults; only for models with learned allocations."""
    options = params["router_options"]
    if not router_parameters(model):
        if options:
            raise ParamError(f"{source}: key 'router_options' is set but model '{params['model']}' has no learned "
                             f"allocation; allowed: {{}}")
        return {}
    completed = {}
    for name, value in options.items():
        if name not in ROUTER_OPTIONS:
            raise ParamError(f"{source}: unknown key 'router_options.{name}'; allowed: {', '.join(ROUTER_OPTIONS)}")
        low, high = ROUTER_OPTIONS[name][1]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise ParamError(f"{source}: key 'router_options.{name}' = {json.dumps(value)}; allowed: a number from "
                             f"{low} to {high}")
        completed[name] = float(value)
    completed = {name: completed.get(name, default) for name, (default, _) in ROUTER_OPTIONS.items()}
    if completed["temperature_min"] > completed["temperature_init"]:
        raise ParamError(f"{source}: key 'router_options.temperature_min' ({completed['temperature_min']}) exceeds "
                         f"'temperature_init' ({completed['temperature_init']}); allowed: at most temperature_init")
    return completed


def _check_option_type(key, value, default, source):
    """An option must have the type of its default (an int is accepted for a float); no default, no check."""
    if default is inspect.Parameter.empty or default is None:
        return
    kind = type(default)
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or isinstance(value, bool) != (kind is bool):
        raise ParamError(f"{source}: key '{key}' must be {kind.__name__}, got {json.dumps(value)}; "
                         f"allowed: {kind.__name__} (default {json.dumps(default)})")


def required_keys(schema=SCHEMA):
    return [key for key, entry in schema.items() if entry[1] is REQUIRED]


def _allowed(key, schema=SCHEMA):
    kind, _, allowed, _ = schema[key]
    if isinstance(allowed, tuple) and allowed and isinstance(allowed[0], str):
        return ", ".join(allowed)
    if isinstance(allowed, tuple):
        return f"{kind.__name__} from {allowed[0]} to {allowed[1]}"
    return kind.__name__


def schema_markdown():
    """The schema as a Markdown table (rendered into docs/params.md)."""
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, (kind, default, _, meaning) in SCHEMA.items():
        shown = "required" if default is REQUIRED else json.dumps(default)
        lines.append(f"| `{key}` | {kind.__name__} | {shown} | {_allowed(key)} | {meaning} |")
    return "\n".join(lines)
