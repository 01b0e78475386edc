"""
Speed on a GPU: CUDA graphs (--cuda-graphs) and torch.compile (--compile). Neither changes what
is computed; each only changes how the kernels are launched.
"""
import functools

import torch


class CudaGraphs:
    """Run modules' training calls as CUDA graphs, one per shape of their inputs, each captured on
    first use (torch.cuda.make_graphed_callables): the hundreds of small kernels of a call, forward
    and backward, are then launched as one. --cuda-graphs "context": the context interactions
    (Eq. 7-10, GRU loops of ~40 kernels a step); "all": the encoders too. The grid of shapes
    (data.buckets) bounds how many graphs a run captures; each keeps the memory of its activations.

    A graph's activations live in it until its backward: a shape met again in the same forward of
    the model (two buckets of one shape) needs a graph of its own. So each graphed module counts
    its uses of each shape, and every call of the model, model(batch), starts the counts again:
    training goes through it (a training call that bypassed it would capture new graphs). The
    object installs itself on the model; nothing else needs to keep it."""

    def __init__(self, model, which):
        self.uses = []  # each graphed module's {input key: uses in the current forward of the model}
        for module in model.context.values():
            self.graph(module)
        for enc in model.encoders() if which == "all" else ():
            self.graph(enc, check=False)  # the graphs are for calls without the encoders' input checks
        model.register_forward_pre_hook(self.new_forward)

    def new_forward(self, *_):
        """A forward of the model begins: every graph is free again"""
        for uses in self.uses:
            uses.clear()

    def graph(self, module, **fixed):
        """Graph a module's training calls; fixed: keyword arguments every such call has"""
        eager, graphs, uses = module.forward, {}, {}
        self.uses.append(uses)

        def forward(*args, **kwargs):
            if not (module.training and torch.is_grad_enabled()) or kwargs != fixed:
                return eager(*args, **kwargs)
            key = tuple((a.shape, a.dtype, a.requires_grad) for a in args) + (torch.is_autocast_enabled(),)
            uses[key] = uses.get(key, -1) + 1
            key += (uses[key],)
            if key not in graphs:
                module.forward = functools.partial(eager, **fixed)  # what the capture runs
                samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
                graphs[key] = torch.cuda.make_graphed_callables(module, samples, num_warmup_iters=1,
                                                                allow_unused_input=True).forward
                module.forward = forward
            return graphs[key](*args)

        module.forward = forward


def compile_encoders(model):
    """torch.compile BERT and HuBERT, the bulk of the work, for any batch and sequence length"""
    model.check_inputs = False  # the dataset is checked when prepared; a check would break the graph
    for enc in model.encoders():
        enc.compile(dynamic=True)
