"""Helpers shared by the tests of the reversible families (Hamiltonian, RevNet): the same network in
memory-efficient and plain mode, and what a training forward keeps for backward."""
import timm
import torch


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def memory_efficient_and_plain(model_name, **kwargs):
    """The same network in memory-efficient and plain mode, float64, identical weights."""
    rev = timm.create_model(model_name, memory_efficient=True, **kwargs).double()
    plain = timm.create_model(model_name, memory_efficient=False, **kwargs).double()
    plain.load_state_dict(rev.state_dict())
    return rev, plain


def saved_bytes(model, x) -> int:
    """Bytes of the tensors a forward of ``model`` on ``x`` saves for backward."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(total)


def assert_gradients_equal_plain_autograd(rev, plain, x, rel_tol=1e-8):
    """Input and parameter gradients of a train-mode step of ``rev`` equal those of ``plain`` (relative)."""
    target = torch.randn(x.shape[0], plain.num_classes, dtype=x.dtype)
    results = []
    for model in (plain, rev):
        model.train()
        inp = x.clone().requires_grad_()
        (model(inp) * target).sum().backward()
        results.append([inp.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(results[1], results[0]):
        assert (a - b).norm() <= rel_tol * b.norm(), f'relative error {((a - b).norm() / b.norm()).item():.3g}'
