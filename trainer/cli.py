"""``kestrel-train``: image folders -> pruned, int8, evaluated, signed bundle.

Commands: run (the whole pipeline), ingest / train / optimize / evaluate / report (one stage on a run dir),
keygen, package, push, push-model, digits (a local demo data set), config-doc. Errors print one line and exit non-zero
(proto.errors.run_command: 2 = bad input, a refused gate or a push the hub refused; 3 = hub unreachable or failing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from proto.errors import DEBUG_HELP, ArtifactError, run_command
from proto.hubcreds import quiet_grpc_core
from trainer.config import ARCHS

# flag dest -> config field
OVERRIDES: Dict[str, str] = {
    "min_side": "data.min_side", "phash_distance": "data.phash_distance", "test_fraction": "data.test_fraction",
    "seed": "data.seed", "arch": "model.arch", "input_size": "model.input_size", "alpha": "model.alpha",
    "channels": "model.channels", "width": "model.width", "weights": "model.weights",
    "normalization": "model.normalization", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate", "folds": "train.folds", "cv_epochs": "train.cv_epochs",
    "augment": "train.augment", "flip": "train.flip", "head_epochs": "train.head_epochs",
    "sparsity": "optimize.sparsity", "latency_budget_ms": "gate.latency_budget_ms",
    "prune_epochs": "optimize.prune_epochs", "qat": "optimize.qat", "io_dtype": "optimize.io_dtype",
    "max_accuracy_drop": "gate.max_accuracy_drop", "model_name": "gate.model_name",
    "default_threshold": "gate.default_threshold", "errors_to_catch": "gate.errors_to_catch",
}
DEFAULT_HUB = "127.0.0.1:50051"  # proto.hubclient.DEFAULT_HUB, not imported: it loads grpc (~0.1 s a command)
DEFAULT_KEY = "keys/signing.key"
RUNS_DIR = "runs"


def _hub_credentials(p: argparse.ArgumentParser) -> None:
    """The token and the CA a push connects with (proto.hubcreds: flag, environment, ~/.config/kestrel/)."""
    from proto import hubcreds

    p.add_argument("--token-file", default="", help=f"file with a hub token of role trainer (default: "
                                                    f"${hubcreds.TOKEN_ENV}, else "
                                                    f"~/.config/kestrel/{hubcreds.TOKEN_NAME})")
    p.add_argument("--ca-file", default="", help=f"the fleet CA that signed the hub's certificate (default: "
                                                 f"${hubcreds.CA_ENV}, else ~/.config/kestrel/{hubcreds.CA_NAME})")
    p.add_argument("--plaintext", action="store_true", help="no TLS: the hub's [grpc] plain_port on this machine")


def _hub(args: argparse.Namespace, token_file: str = "") -> Any:
    from proto import hubcreds
    from proto.hubclient import HubClient

    creds = hubcreds.load(token_file or args.token_file, args.ca_file, args.plaintext)
    return HubClient(args.hub, creds=creds)


def _progress(args: argparse.Namespace) -> Any:
    if getattr(args, "no_progress", False):
        return None
    from tqdm import tqdm

    return tqdm


def _config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config (override the TOML file; see `kestrel-train config-doc`)")
    g.add_argument("--config", help="TOML config file (unknown keys are rejected)")
    g.add_argument("--min-side", type=int)
    g.add_argument("--phash-distance", type=int)
    g.add_argument("--test-fraction", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--arch", choices=list(ARCHS))
    g.add_argument("--input-size", type=int)
    g.add_argument("--alpha", type=float)
    g.add_argument("--channels", type=int, choices=[1, 3])
    g.add_argument("--width", type=int, help="small_cnn first-block filters")
    g.add_argument("--weights", help="local Keras ImageNet weights file (.h5, no top) for the MobileNet")
    g.add_argument("--normalization", choices=["0_1", "-1_1", "raw"])
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--learning-rate", type=float)
    g.add_argument("--folds", type=int, help="k of the k-fold CV (0 = skip)")
    g.add_argument("--cv-epochs", type=int)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--head-epochs", type=int, help="transfer learning: frozen-backbone epochs before fine-tuning")
    g.add_argument("--sparsity", type=float)
    g.add_argument("--prune-epochs", type=int)
    g.add_argument("--qat", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--io-dtype", choices=["uint8", "int8"])
    g.add_argument("--max-accuracy-drop", type=float, help="gate tolerance in accuracy points (default 1.0)")
    g.add_argument("--model-name")
    g.add_argument("--errors-to-catch", type=float,
                   help="share of the held-out errors the bundle's default sampling threshold must send to the "
                        "hub (default 0.8; the threshold is chosen from the held-out data)")
    g.add_argument("--default-threshold", type=float,
                   help="record this confidence threshold in the bundle instead of the one chosen from the data")
    g.add_argument("--latency-budget-ms", type=float,
                   help="self-test latency budget recorded in the bundle (default 0 = none: the device decides)")


def _config(args: argparse.Namespace) -> Any:
    from trainer.config import apply_overrides, load_config

    cfg = load_config(args.config)
    return apply_overrides(cfg, {field: getattr(args, dest, None) for dest, field in OVERRIDES.items()})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kestrel-train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="the whole pipeline: ingest, train, optimize, evaluate, report [, package]")
    r.add_argument("--data", action="append", required=True, help="class-folder data set (repeatable; merged)")
    r.add_argument("--out", required=True, help="run directory")
    r.add_argument("--key", help="also package: signing key (0600)")
    r.add_argument("--version", type=int, default=1, help="bundle version when packaging (default 1)")
    r.add_argument("--bundle", help="bundle path when packaging (default RUNDIR/model-vN.kbundle)")
    _config_flags(r)

    i = sub.add_parser("ingest", help="read, clean and split the data into RUNDIR")
    i.add_argument("--data", action="append", required=True)
    i.add_argument("--out", required=True)
    _config_flags(i)
    for name, help_ in (("train", "k-fold CV + the final float model"), ("optimize", "prune + int8 conversion"),
                        ("evaluate", "edge-runtime evaluation + gate"), ("report", "HTML report with plots")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("rundir")

    k = sub.add_parser("keygen", help="create an Ed25519 signing key pair (signing.key 0600 + signing.pub)")
    k.add_argument("--out", required=True)

    pk = sub.add_parser("package", help="sign the evaluated int8 model into a bundle (refused if the gate failed)")
    pk.add_argument("rundir")
    pk.add_argument("--key", required=True)
    pk.add_argument("--version", type=int, required=True)
    pk.add_argument("--out", required=True)

    pu = sub.add_parser("push", help="push a bundle to the hub's model registry")
    pu.add_argument("bundle")
    pu.add_argument("--hub", default=DEFAULT_HUB, help=f"host:port of the hub's gRPC (default {DEFAULT_HUB})")
    _hub_credentials(pu)

    pm = sub.add_parser("push-model", help="package the latest run (or take --bundle), push, optionally deploy")
    pm.add_argument("--bundle")
    pm.add_argument("--hub", default=DEFAULT_HUB)
    pm.add_argument("--version", type=int, help="bundle version (default: hub's latest + 1)")
    pm.add_argument("--key", default=os.environ.get("KESTREL_SIGNING_KEY", DEFAULT_KEY))
    pm.add_argument("--run", help=f"run dir (default: newest under ./{RUNS_DIR})")
    pm.add_argument("--deploy", help="fleet group to deploy to, or device:ID")
    _hub_credentials(pm)
    pm.add_argument("--deploy-token-file", default="",
                    help="with --deploy: a token that may deploy (role operator or admin), when --token-file's "
                         "may only push (role trainer); default: the --token-file one")

    dg = sub.add_parser("digits", help="write sklearn's bundled digits as a class-folder data set (demo/tests)")
    dg.add_argument("--out", required=True)
    dg.add_argument("--per-class", type=int, help="images per class (default: all, ~180)")
    dg.add_argument("--size", type=int, default=32, help="upscaled image size in pixels (default 32)")
    dg.add_argument("--classes", type=int, help="only the first N digits")
    dg.add_argument("--seed", type=int, help="with --per-class: a seeded random choice per class instead of the "
                                             "first ones (which come from few writers)")
    sub.add_parser("config-doc", help="print the documented config reference")
    for sp in sub.choices.values():
        sp.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
        sp.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's, absl's and the TFLite runtime's own log output (hidden by "
                             "default)")
        sp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def _load_key_early(path: Optional[str]) -> None:
    if path:
        from proto.keys import load_private_key

        load_private_key(path)


def cmd_run(args: argparse.Namespace) -> int:
    from trainer import pipeline
    from trainer.evaluate import enforce_gate
    from trainer.models import check_weights
    from trainer.rundir import check_writable_dir

    cfg = _config(args)
    rundir = Path(args.out)
    bundle_out = Path(args.bundle or rundir / f"model-v{args.version}.kbundle")
    # Everything that can be wrong with the input is checked before ingest and training start.
    if args.version < 1:
        raise ArtifactError(f"--version must be >= 1 (bundle versions are monotonic from 1), got {args.version}")
    check_writable_dir(rundir, "--out")
    if args.key:
        check_writable_dir(bundle_out.parent, "--bundle folder")
    _load_key_early(args.key)             # loose permissions -> error before any long work
    check_weights(cfg.model)              # wrong architecture -> error before any long work
    prog = _progress(args)
    rep = pipeline.ingest(rundir, args.data, cfg, prog)
    print(f"ingest: kept {rep['kept']} of {rep['seen']} ({rep['dropped_by_reason'] or 'nothing dropped'}); "
          f"classes {list(rep['classes'])}")
    tr = pipeline.train(rundir, prog)
    cv = tr["cv"]
    if not cv.get("skipped"):
        print(f"cv ({cv['k']}-fold): accuracy {cv['accuracy']['mean']:.4f} +- {cv['accuracy']['std']:.4f}, "
              f"macro F1 {cv['macro_f1']['mean']:.4f} +- {cv['macro_f1']['std']:.4f}")
    print(f"float model on held-out test: accuracy {tr['test']['accuracy']:.4f}")
    op = pipeline.optimize(rundir, prog)
    print(f"pruned: sparsity {op['sparsity']['overall']:.3f}")
    ev = pipeline.evaluate(rundir, prog)
    for name, st in ev["stages"].items():
        print(f"  {name:13s} accuracy {st['accuracy']:.4f}  {st['bytes']:9d} B  gzip {st['gzip_bytes']:9d} B  "
              f"{st['latency']['median_ms']:.3f} ms")
    print(threshold_line(ev, cfg.gate.default_threshold))
    for w in ev.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    html = pipeline.report(rundir)
    print(f"report: {html}")
    enforce_gate(ev["gate"])
    if args.key:
        res = pipeline.package(rundir, args.key, args.version, bundle_out)
        print(bundle_line(res))
    return 0


def threshold_line(ev: Dict[str, Any], configured: Optional[float]) -> str:
    """What the bundle's default sampling threshold will be, where it comes from and what it sends."""
    from trainer.threshold import resolve

    r = resolve(ev["threshold"], configured)
    caught = (f"{r['caught']} of {r['n_errors']} held-out errors ({r['caught_share']:.0%}; about "
              f"{r['expected']['caught_share']:.0%} expected on new frames)" if r["n_errors"]
              else "no held-out errors to catch")
    why = {"data": f"chosen to catch {r['target']:.0%} of the errors with the fewest frames",
           "config": "[gate] default_threshold (wins over the data's choice)",
           "device default": "the device default: nothing to choose from"}[r["source"]]
    return (f"sampling threshold {r['threshold']:.2f} ({why}): sends {r['sent_share']:.0%} of held-out frames, "
            f"{caught}")


def bundle_line(res: Dict[str, Any]) -> str:
    return (f"bundle: {res['bundle']} ({res['bytes']} bytes, version {res['version']}, default threshold "
            f"{res['default_threshold']:.2f} from {res['threshold_source']})")


def cmd_ingest(args: argparse.Namespace) -> int:
    from trainer import pipeline

    rep = pipeline.ingest(Path(args.out), args.data, _config(args), _progress(args))
    print(f"ingest: kept {rep['kept']} of {rep['seen']}; dropped {rep['dropped_by_reason']}; split {rep['split']}")
    for w in rep.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from trainer import pipeline

    rundir = Path(args.rundir)
    if not rundir.is_dir():
        raise ArtifactError(f"run dir {rundir} does not exist: run `kestrel-train ingest --data DIR --out {rundir}`")
    if args.command == "report":
        print(f"report: {pipeline.report(rundir)}")
        return 0
    res = getattr(pipeline, args.command)(rundir, _progress(args))
    if args.command == "evaluate":
        from trainer.evaluate import enforce_gate
        from trainer.rundir import run_config

        g = res["gate"]
        print(f"gate {'passed' if g['passed'] else 'FAILED'}: int8 {g['int8_accuracy']:.4f} vs float "
              f"{g['float_accuracy']:.4f} (drop {g['drop_points']:.2f} points, allowed {g['max_drop_points']})")
        print(threshold_line(res, run_config(rundir).gate.default_threshold))
        for w in res.get("warnings", []):
            print(f"warning: {w}", file=sys.stderr)
        enforce_gate(g)                   # exit 2 like `run`: the results are written, packaging will refuse
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from proto.keys import generate_keypair

    priv, pub = generate_keypair(Path(args.out))
    print(f"private key: {priv} (mode 0600; keep it secret)\npublic key:  {pub} (install on devices and hub)")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from trainer import pipeline

    res = pipeline.package(Path(args.rundir), args.key, args.version, Path(args.out))
    print(bundle_line(res))
    return 0


def _read_bundle(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read bundle {path}: {exc.strerror}") from exc


def cmd_push(args: argparse.Namespace) -> int:
    from trainer.push import describe

    with _hub(args) as client:
        res = client.push(_read_bundle(args.bundle))
    print(f"pushed {describe(res)} to {args.hub}")
    return 0


def latest_run(root: Path = Path(RUNS_DIR)) -> Path:
    runs = [p for p in root.glob("*") if (p / "evaluate" / "evaluate.json").is_file()] if root.is_dir() else []
    if not runs:
        raise ArtifactError(f"no evaluated run under ./{root}: train one with "
                            f"`kestrel-train run --data DIR --out {root}/NAME` or pass --bundle")
    return max(runs, key=lambda p: (p / "evaluate" / "evaluate.json").stat().st_mtime)


def cmd_push_model(args: argparse.Namespace) -> int:
    from trainer import pipeline
    from trainer.push import deploy, describe, latest_version
    from trainer.rundir import run_config

    with _hub(args) as client:
        if args.bundle:
            data = _read_bundle(args.bundle)
            from proto.bundle import read_manifest_unverified

            man = read_manifest_unverified(data)
            name, version = man.model_name, man.version
            if args.version is not None and args.version != version:
                raise ArtifactError(f"--version {args.version} (VERSION=) does not match the bundle {args.bundle}, "
                                    f"which is {name} version {version}: leave VERSION out with BUNDLE, or "
                                    "package the run again with that version")
        else:
            rundir = Path(args.run) if args.run else latest_run()
            _load_key_early(args.key)
            name = run_config(rundir).gate.model_name
            version = args.version if args.version is not None else latest_version(client, name) + 1
            out = rundir / f"model-v{version}.kbundle"
            pipeline.package(rundir, args.key, version, out)
            print(f"packaged {rundir} as {out}")
            data = out.read_bytes()
        res = client.push(data)
        print(f"pushed {describe(res)} to {args.hub}")
        if args.deploy:
            if args.deploy_token_file:
                with _hub(args, args.deploy_token_file) as deployer:
                    d = deploy(deployer, name, version, args.deploy)
            else:
                d = deploy(client, name, version, args.deploy)
            print(f"deployed {name} v{version} to {args.deploy} (topic {d.topic})")
    return 0


def cmd_digits(args: argparse.Namespace) -> int:
    from trainer.datasets import write_digits

    out = write_digits(args.out, per_class=args.per_class, size=args.size, classes=args.classes, seed=args.seed)
    print(f"digits data set: {out}")
    return 0


def cmd_config_doc(args: argparse.Namespace) -> int:
    from trainer.config import config_doc

    print(config_doc())
    return 0


HANDLERS = {"run": cmd_run, "ingest": cmd_ingest, "train": cmd_stage, "optimize": cmd_stage,
            "evaluate": cmd_stage, "report": cmd_stage, "keygen": cmd_keygen, "package": cmd_package,
            "push": cmd_push, "push-model": cmd_push_model, "digits": cmd_digits,
            "config-doc": cmd_config_doc}


def main(argv: Optional[List[str]] = None) -> int:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    quiet_grpc_core()  # before anything imports grpc
    args = build_parser().parse_args(argv)
    quiet: Any = contextlib.nullcontext()
    if not args.verbose:
        from trainer.quiet import quiet_native, quiet_python

        quiet_python()
        quiet = quiet_native()
    with quiet:
        return run_command(f"kestrel-train {args.command}", lambda: HANDLERS[args.command](args),
                           debug=args.debug)
