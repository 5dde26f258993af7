"""`scaling run`, `scaling fit` and `scaling tasks`: a ladder of model sizes on the same tokens,
its law, and which tasks gain from scale."""

from __future__ import annotations

import argparse

import ml_collections

from gopher_jax import config as config_lib
from gopher_jax import workdir as workdir_lib
from gopher_jax.cli import common, console
from gopher_jax.errors import UsageError, UserError


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    if name == "scaling run":
        common.add_config(p, default="experiments/scaling_ladder.py")
        common.add_workdir(p, default=None)
        p.add_argument("--member", default="",
                       help="only these members (indices, smallest first, or names; "
                            "comma-separated); each trains under its own lock, so several "
                            "processes may share one --workdir")
    elif name == "scaling tasks":
        from gopher_jax.cli.tasks import add_task_arguments

        common.add_config(p, default=None)
        common.add_workdir(p, default=None)
        add_task_arguments(p)
    elif name == "scaling plan":
        p.add_argument("--flops", type=float, required=True, metavar="C",
                       help="the training FLOP budget, e.g. 5.76e23 (Gopher's)")
        p.add_argument("--law", default="", metavar="E=..,A=..,B=..,alpha=..,beta=..",
                       help="L(N, D) = E + A/N^alpha + B/D^beta; default: Hoffmann et al.'s "
                            "approach-3 fit (E=1.69,A=406.4,B=410.7,alpha=0.34,beta=0.28)")
        p.add_argument("--workdir", default="", metavar="DIR",
                       help="a grid ladder after `scaling fit`: its approach-3 law (and the "
                            "bootstrap interval of N_opt)")
        p.add_argument("--batch_tokens", type=int, default=0,
                       help="tokens per step (default: the nearest Table-1 row's batch)")
        p.add_argument("--seq_len", type=int, default=2048, help="context length")
        p.add_argument("--vocab", type=int, default=32_000, help="vocabulary size")
        p.add_argument("--topology", default="", metavar="GEN:AxBxC",
                       help="also compile the config's train step for this TPU topology "
                            "(needs .[tpu]; slow) and report its per-chip memory")
    else:
        common.add_workdir(p, default=None)
        p.add_argument("--replicates", type=int, default=200,
                       help="bootstrap replicates (members redrawn) of a grid ladder's fits")


def _ladder(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """--config if given, else the ladder.json that `scaling run` left in the workdir."""
    workdir = common.existing_workdir(args.workdir)
    if args.config is not None:
        return common.load_config(args)
    path = workdir / workdir_lib.LADDER_JSON
    if not path.is_file():
        raise UserError(f"{workdir} has no {workdir_lib.LADDER_JSON} (not a `scaling run` "
                        "workdir?)", "pass the --workdir of `scaling run`, or --config LADDER_FILE")
    return config_lib.from_json(path.read_text())


def _run_tasks(args: argparse.Namespace) -> int:
    from gopher_jax.cli.tasks import given_tasks, resolve_tasks
    from gopher_jax.scaling import task_scaling
    from gopher_jax.scaling.ladder import member_config, member_names
    from gopher_jax.tasks import run as run_lib

    given = given_tasks(args)  # a malformed task file is refused before any model loads
    ladder = _ladder(args)
    common.writable_dir(args.workdir)
    # Every member shares the data and tokenizer, so the first member's config resolves them.
    tasks = resolve_tasks(args, member_config(ladder, member_names(ladder)[0]), given)

    def score(c: ml_collections.ConfigDict, mdir, member_tasks) -> run_lib.TaskResults:
        # The batch size changes nothing in the results (the runner guarantees it), so it
        # stays out of the fingerprint.
        return run_lib.run(c, mdir, member_tasks, args.batch_size, args.max_new_tokens)

    out = task_scaling.run(ladder, args.workdir, tasks, score,
                           {"max_new_tokens": args.max_new_tokens}, log=console.out)
    console.out(task_scaling.markdown(out["results"]).rstrip())
    console.out(f"[scaling tasks] wrote {args.workdir}/{task_scaling.OUT}.{{json,md,png}}")
    return 0


def _law(args: argparse.Namespace) -> tuple[dict, str, dict | None]:
    """(law, where it comes from, its bootstrap replicates or None)."""
    import json

    from gopher_jax.scaling import grid_fit, lnd

    if args.law and args.workdir:
        raise UsageError("--law and --workdir both given", "pass one of them")
    if args.workdir:
        path = common.existing_workdir(args.workdir) / grid_fit.OUT
        if not path.is_file():
            raise UserError(f"{path} does not exist",
                            f"run `python -m gopher_jax scaling fit --workdir {args.workdir}` "
                            "on a grid ladder first")
        fit = json.loads(path.read_text())["approach3"]
        if "error" in fit:
            raise UserError(f"{path} has no L(N, D) fit: {fit['error']}",
                            "train more members, then `scaling fit` again")
        return ({k: fit[k]["value"] for k in lnd.LAW_KEYS}, f"approach 3 of {path}",
                fit.get("replicates"))
    if not args.law:
        return dict(lnd.HOFFMANN), "Hoffmann et al. 2022, approach 3", None
    try:
        return lnd.parse(args.law), "--law", None
    except ValueError as e:
        raise UsageError(f"--law={args.law!r}: {e}",
                         "give E=..,A=..,B=..,alpha=..,beta=.. (each once, A B alpha beta > 0)"
                         ) from None


def _plan(args: argparse.Namespace) -> int:
    import math

    from gopher_jax.model.sizes import human
    from gopher_jax.scaling import plan

    if not (args.flops > 0 and math.isfinite(args.flops)):
        raise UsageError(f"--flops={args.flops} must be a positive number", "e.g. --flops 1e21")
    for flag in ("batch_tokens", "seq_len", "vocab"):
        if getattr(args, flag) < (0 if flag == "batch_tokens" else 1):
            raise UsageError(f"--{flag}={getattr(args, flag)} is too small",
                             "pass a positive count")
    if args.topology:
        from gopher_jax import aot

        aot.parse_topology(args.topology)  # a typo is refused before anything runs
    law, source, replicates = _law(args)
    p = plan.plan(law, args.flops, args.batch_tokens, args.seq_len, args.vocab, replicates)
    s = p["shape"]
    law_s = ", ".join(f"{k}={law[k]:g}" for k in ("E", "A", "B", "alpha", "beta"))
    iv = p.get("n_opt_interval")
    iv_s = f" (bootstrap 90% interval {human(iv[0])}-{human(iv[1])})" if iv else ""
    c = p["config"]
    console.out("\n".join([
        f"scaling plan for C = {args.flops:.4g} training FLOPs; law {law_s} ({source})",
        f"  compute-optimal under C = 6ND: N_opt = {p['n_opt']:.6g} parameters{iv_s}, "
        f"D_opt = {p['d_opt']:.6g} tokens ({p['tokens_per_param']:.1f} tokens per parameter), "
        f"predicted loss {p['loss']:.4f}",
        f"    closed form N_opt = G (C/6)^a with G = {p['G']:.6g}, a = {p['a']:.4f} "
        f"(D_opt ~ C^{p['b']:.4f}); numeric argmin_N L(N, C/(6N)) = {p['numeric_n_opt']:.6g} "
        f"(relative difference {p['numeric_n_opt'] / p['n_opt'] - 1:+.1e})",
        f"  nearest Gopher-shaped config: {s['num_layers']} layers x d_model {s['d_model']}, "
        f"{s['num_heads']} heads x {s['head_dim']}, d_ff {s['d_ff']}, vocabulary "
        f"{args.vocab}: {human(s['params'])} parameters ({human(s['params_non_embedding'])} "
        f"non-embedding); recipe of Table 1's {p['table1_row']}",
        f"  its tokens at this project's {p['flops_per_token']:.4g} training FLOPs per token "
        f"(context {p['seq_len']}): {p['tokens']:.4g}; at {p['batch_tokens']:,} tokens a step "
        f"({c.train.batch_size} x {p['seq_len']}): {p['steps']:,} steps; predicted loss "
        f"{p['loss_of_shape']:.4f}",
    ]))
    if args.topology:
        m = plan.with_memory(p, args.topology)
        if "report" in m:
            console.out(f"  on {args.topology} (batch {m['batch_size']} sequences):\n"
                        + "\n".join("    " + line for line in m["report"].splitlines()))
        else:
            console.out(f"  on {args.topology}: DOES NOT FIT: {m['error']}")
        return 0 if m["fits"] else 1
    return 0


def run(args: argparse.Namespace) -> int:
    from gopher_jax import scaling

    if args.name == "scaling plan":
        return _plan(args)
    if args.name == "scaling fit":
        common.existing_workdir(args.workdir)
        if args.replicates < 10:
            raise UsageError(f"--replicates={args.replicates} is too few", "pass 10 or more")
        scaling.fit(args.workdir, log=console.out, replicates=args.replicates)
        return 0
    if args.name == "scaling tasks":
        return _run_tasks(args)
    ladder = common.load_config(args)
    common.writable_dir(args.workdir)
    common.writable_dir(ladder.data.data_dir, "data dir (data.data_dir)")
    out = scaling.run(ladder, args.workdir, args.member or None, log=console.out)
    if out["busy"]:
        console.out(f"[scaling] left to the processes training them: {', '.join(out['busy'])}")
    return 1 if out["failed"] else 0
