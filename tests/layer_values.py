"""Per-layer comparison of a simulated graph and its lowerings on identical inputs.

Each graph is run once through an :class:`torch.fx.Interpreter` that keeps every node's value.
For each quantized layer the float tensor its input quantizer reads in the *reference* graph
(``x0``: after a norm that absorbed LES's 1/tau, before an LES division that merged into the
quantize step) is fed to the quantize chain and layer of the other graphs, so every graph's
layer output is computed from the same float input and only the layer's own arithmetic differs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from dmq_fx.passes import LESScale
from torch import fx

from dmq_fx.graph.meta import ANNOTATION_KEY
from dmq_fx.lowering.quantized_modules import QDQ_OPS, QuantizedLayer


def node_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[fx.Node, Any]:
    """The value of every node of ``gm`` in one call with ``args`` / ``kwargs``."""
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    env: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            env[n] = super().run_node(n)
            return env[n]

    with torch.no_grad():
        Recorder(gm).run(*bound.arguments.values())
    return env


def layer_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {
        n.target: n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantizedLayer)
    }


def _chain(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The float tensor a layer input was quantized from and the quantize ops in between."""
    chain = []
    while node.op == "call_function" and node.target in QDQ_OPS:
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _replay(chain: list[fx.Node], source: fx.Node, x0, env) -> Any:
    values = {source: x0}
    for n in chain:
        args = fx.node.map_arg(n.args, lambda a: values[a] if a in values else env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a] if a in values else env[a])
        values[n] = n.target(*args, **kwargs)
    return values[chain[-1]] if chain else x0


def lowered_layer_outputs(gm: fx.GraphModule, env, x0s: dict[str, list]) -> dict[str, Any]:
    """Each lowered layer of ``gm`` applied to its own quantize chain of the floats ``x0s``."""
    out = {}
    with torch.no_grad():
        for name, node in layer_nodes(gm).items():
            inputs = []
            for arg, x0 in zip(node.args, x0s[name]):
                source, chain = _chain(arg)
                inputs.append(_replay(chain, source, x0, env))
            out[name] = gm.get_submodule(name)(*inputs)
    return out


def reference_inputs(ref: fx.GraphModule, env) -> dict[str, list]:
    """Per lowered layer of the reference graph, the float tensors its quantize chains read."""
    return {name: [env[_chain(a)[0]] for a in node.args] for name, node in layer_nodes(ref).items()}


def simulated_layer_outputs(sim: fx.GraphModule, env, ref: fx.GraphModule, x0s) -> dict:
    """Each quantized layer of the simulation (fake-quantized input, weight and, with LES, the
    division) applied to the reference graph's floats ``x0s``."""
    ref_specs = {name: node.meta[ANNOTATION_KEY] for name, node in layer_nodes(ref).items()}
    out = {}
    with torch.no_grad():
        for node in sim.graph.nodes:
            if node.op != "call_module" or node.target not in x0s:
                continue
            spec = ref_specs[node.target]
            grouped = len(x0s[node.target]) > 1
            cat = node.args[0] if grouped else None
            quant_nodes = list(cat.args[0]) if grouped else [node.args[0]]
            inputs = []
            for qnode, x0 in zip(quant_nodes, x0s[node.target]):
                x, src = x0, qnode.args[0]
                is_les = src.op == "call_module" and isinstance(
                    sim.get_submodule(src.target), LESScale
                )
                if is_les and spec.les_lowering == "step":  # not folded into a norm
                    x = sim.get_submodule(src.target)(x0, *src.args[1:])
                extra = [env[a] if isinstance(a, fx.Node) else a for a in qnode.args[1:]]
                inputs.append(sim.get_submodule(qnode.target)(x, *extra))
            if grouped:
                dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
                x = torch.cat(inputs, dim)
            else:
                x = inputs[0]
            out[node.target] = sim.get_submodule(node.target)(x)
    return out


def without_rounding_ties(sim: fx.GraphModule, ref: fx.GraphModule, x0s, window: float = 1e-3):
    """``x0s`` with the elements that sit at a rounding tie of an LES layer's quantize step set
    to 0 (quantized alike everywhere).

    Where LES's division stays in front of a quantizer (``les:step``), the lowering quantizes
    ``x0 * (1 / (tau * s))`` in one product and the simulation ``(x0 / tau) * (1 / s)``: the two
    float results can round to different integers when ``x0 / (tau * s)`` lies within a few ulp
    of a .5 tie. Those elements are found (within ``window`` of a tie) and zeroed, in every
    graph's input alike, so the comparison measures each layer's own arithmetic.
    """
    specs = {name: node.meta[ANNOTATION_KEY] for name, node in layer_nodes(ref).items()}
    out = dict(x0s)
    for node in sim.graph.nodes:
        if node.op != "call_module" or specs.get(node.target) is None:
            continue
        if specs[node.target].les_lowering != "step":
            continue
        grouped = len(x0s[node.target]) > 1
        quant_nodes = list(node.args[0].args[0]) if grouped else [node.args[0]]
        cleaned = []
        for qnode, x0 in zip(quant_nodes, x0s[node.target]):
            les_node, fq = qnode.args[0], sim.get_submodule(qnode.target)
            les = sim.get_submodule(les_node.target)
            tau = les.broadcastable(x0, *les_node.args[1:])
            axis = les.channel_axis % x0.dim()
            step = torch.full((x0.shape[axis],), float(fq.scale))
            if hasattr(fq, "channel_steps"):  # PTS: per-channel power-of-two steps
                step = fq.channel_steps(x0.shape[axis])
            step = step.view(-1, *([1] * (x0.dim() - axis - 1)))
            v = x0 / tau / step
            near_tie = ((v - v.floor()) - 0.5).abs() < window
            cleaned.append(torch.where(near_tie, torch.zeros_like(x0), x0))
        out[node.target] = cleaned
    return out


def folded_norm_outputs(sim: fx.GraphModule, ref: fx.GraphModule, env_ref) -> dict[str, tuple]:
    """Per norm that absorbed LES's 1/tau (``les:norm``): the lowered norm's output and the
    simulation's norm followed by its LES division, on the input the reference graph gave it."""
    specs = {name: node.meta[ANNOTATION_KEY] for name, node in layer_nodes(ref).items()}
    sim_nodes = {n.target: n for n in sim.graph.nodes if n.op == "call_module"}
    out = {}
    with torch.no_grad():
        for name, node in layer_nodes(ref).items():
            if specs[name].les_lowering != "norm":
                continue
            norm_node, _ = _chain(node.args[0])
            x = env_ref[norm_node.args[0]]
            les_node = sim_nodes[name].args[0].args[0]
            assert les_node.args[0].target == norm_node.target, name
            expected = sim.get_submodule(les_node.target)(sim.get_submodule(norm_node.target)(x))
            out[norm_node.target] = (ref.get_submodule(norm_node.target)(x), expected)
    return out
