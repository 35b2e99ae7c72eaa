"""A fake ``tensorrt`` module for the refit tests: the builder, runtime and refitter calls sdfast
makes, with TensorRT 10's names and shapes, over a "plan" that is the ONNX graph's I/O and
initializers. It records what a GPU run cannot show on the CPU: the builder flags of each build,
every refit (the names and values it set) and the weights the engine holds after it.

Faithful where the tests lean on it: ``set_named_weights`` takes a ``Weights`` and refuses (False)
a name the plan lacks, another element count or type, or any weight of a plan built without
``BuilderFlag.REFIT``; ``get_missing_weights`` names the weights the builder "optimized together"
with a set one (``engine.partners``) that were not set; ``refit_cuda_engine`` fails while any is
missing. ``engine.fail_refit = n`` makes the next n ``refit_cuda_engine`` calls apply half of their
weights and return False, as a refit that fails midway may leave a real engine.
"""

from __future__ import annotations

import pickle
import types

import numpy as np

MAGIC = b"FAKEPLAN"
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 9: "BOOL"}
NP_TYPES = {np.dtype("float32"): "FLOAT", np.dtype("float16"): "HALF"}


class Weights:
    """trt.Weights(numpy array): borrows the array's memory, as the real one does."""

    def __init__(self, a: np.ndarray):
        self._a = a
        self.size = a.size
        self.dtype = NP_TYPES[a.dtype]

    def numpy(self) -> np.ndarray:
        return self._a


class _Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.outputs, self.weights = flags, [], [], {}

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return types.SimpleNamespace(name=self.inputs[i][0])


class _Parser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        import onnx
        from onnx import numpy_helper

        m = onnx.load(path)
        inits = {i.name for i in m.graph.initializer}

        def io(vs):
            return [(v.name, ONNX_TYPES[v.type.tensor_type.elem_type]) for v in vs if v.name not in inits]

        self.network.inputs, self.network.outputs = io(m.graph.input), io(m.graph.output)
        arrays = {i.name: numpy_helper.to_array(i).copy() for i in m.graph.initializer}
        self.network.weights = {n: a for n, a in arrays.items() if a.dtype.kind == "f"}
        return True


class _Config:
    def __init__(self):
        self.flags, self.profiles = set(), []

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return object()

    def set_timing_cache(self, cache, ignore_mismatch):
        return True

    def get_timing_cache(self):
        return None


class _Builder:
    def __init__(self, module, logger):
        self.module = module

    def create_network(self, flags):
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return types.SimpleNamespace(set_shape=lambda name, lo, opt, hi: None)

    def build_serialized_network(self, network, config):
        refit = "REFIT" in config.flags
        self.module.builds.append({"inputs": [n for n, _ in network.inputs], "flags": set(config.flags)})
        return MAGIC + pickle.dumps({"io": [(n, "IN", t) for n, t in network.inputs]
                                     + [(n, "OUT", t) for n, t in network.outputs],
                                     "refit": refit, "weights": network.weights})


class _Context:
    def set_tensor_address(self, name, ptr):
        pass


class FakeEngine:
    def __init__(self, module, plan: dict):
        self.module, self.io, self.refittable = module, plan["io"], plan["refit"]
        self.weights = {n: a.copy() for n, a in plan["weights"].items()}  # what the "GPU" holds
        self.built = {n: a.copy() for n, a in plan["weights"].items()}
        self.num_io_tensors = len(self.io)
        self.refits: list[dict[str, np.ndarray]] = []  # every successful refit: name -> value set
        self.partners: dict[str, list[str]] = {}
        self.fail_refit = 0

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return next(m for n, m, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return next(t for n, _, t in self.io if n == name)

    def create_execution_context(self):
        return _Context()


class Refitter:
    def __init__(self, engine: FakeEngine, logger):
        self.engine, self.pending = engine, {}

    def get_all_weights(self):
        return list(self.engine.weights) if self.engine.refittable else []

    def set_named_weights(self, name, weights):
        old = self.engine.weights.get(name)
        if (not self.engine.refittable or old is None or not isinstance(weights, Weights)
                or weights.size != old.size or weights.dtype != NP_TYPES[old.dtype]):
            return False
        self.pending[name] = weights
        return True

    def get_missing_weights(self):
        return sorted({p for n in self.pending for p in self.engine.partners.get(n, []) if p not in self.pending})

    def refit_cuda_engine(self):
        if self.get_missing_weights():
            return False
        self.engine.module.events.append("refit")
        items = sorted(self.pending.items())
        if self.engine.fail_refit:
            self.engine.fail_refit -= 1
            for name, w in items[: max(1, len(items) // 2)]:
                self.engine.weights[name] = w.numpy().reshape(self.engine.weights[name].shape).copy()
            return False
        for name, w in items:
            self.engine.weights[name] = w.numpy().reshape(self.engine.weights[name].shape).copy()
        self.engine.refits.append({n: w.numpy().copy() for n, w in items})
        return True


def make_module() -> types.ModuleType:
    """A fresh fake ``tensorrt``: ``builds`` lists each build, ``engines`` each deserialized engine,
    ``events`` the order of refits (and of the fake streams' synchronize, where a test logs it)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.builds, trt.engines, trt.events = [], [], []
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Builder = lambda logger: _Builder(trt, logger)
    trt.OnnxParser = _Parser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(REFIT="REFIT", REFIT_IDENTICAL="REFIT_IDENTICAL")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="IN", OUTPUT="OUT")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64", BOOL="BOOL")
    trt.Weights = Weights
    trt.Refitter = Refitter

    def deserialize(plan: bytes):
        assert plan.startswith(MAGIC), "not a fake plan"
        engine = FakeEngine(trt, pickle.loads(plan[len(MAGIC):]))
        trt.engines.append(engine)
        return engine

    runtime = types.SimpleNamespace(deserialize_cuda_engine=deserialize)
    trt.Runtime = lambda logger: runtime
    return trt


class FakeStreams:
    """The engine's stream protocol without CUDA; ``synchronize`` is logged in ``events``."""

    handle = 777

    def __init__(self, events: list):
        self.events = events

    def current(self):
        return "caller"

    def enter(self, caller):
        import contextlib

        return contextlib.nullcontext()

    def leave(self, caller, outputs):
        pass

    def synchronize(self):
        self.events.append("synchronize")
