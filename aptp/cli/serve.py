"""`aptp serve`: a bundle over HTTP (FastAPI + uvicorn); settings from APTP_* variables."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from server.openmp import use_serving_wait_policy

    use_serving_wait_policy()  # before torch is imported: OpenMP reads it once
    from pydantic import ValidationError

    from aptp.formats.files import validation_problems
    from server.settings import Settings

    overrides = {k: getattr(args, k) for k in ("bundle", "host", "port", "device") if getattr(args, k) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"aptp serve: invalid setting ({validation_problems(e, limit=20)})", file=sys.stderr)
        return 2
    from aptp.formats.kinds import folder_kind, not_a_model_folder

    if folder_kind(settings.bundle) is None:  # answered before the model libraries are imported
        print(f"aptp serve: error: {not_a_model_folder(settings.bundle)}", file=sys.stderr)
        return 2
    if args.ray:
        try:
            from server.cluster import serve_cluster
        except ImportError as e:
            print(f"aptp serve: error: --ray needs Ray Serve (pip install '.[ray]'): {e}", file=sys.stderr)
            return 2
        from server.settings import ClusterSettings

        try:
            cluster = ClusterSettings()
        except ValidationError as e:
            print(f"aptp serve: invalid APTP_RAY_ setting ({validation_problems(e, limit=20)})", file=sys.stderr)
            return 2
        return serve_cluster(settings, cluster)
    from server.app import serve

    # The server listens at once and loads the bundle meanwhile (/readyz 503 "loading"); a bundle that cannot be
    # served (a checksum, a manifest field) is reported and the server exits with status 2.
    return serve(settings)


def add_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a bundle over HTTP",
        description="Serve a bundle (or a teacher folder as one code) with FastAPI + uvicorn. Every setting is read "
        "from APTP_* environment variables (see server/settings.py); these options override them.",
    )
    serve.add_argument("--bundle", help="bundle or teacher folder (APTP_BUNDLE)")
    serve.add_argument("--host", help="listen address (APTP_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (APTP_PORT, default 8000)")
    serve.add_argument("--device", help="torch device (APTP_DEVICE, default cpu)")
    serve.add_argument(
        "--ray",
        action="store_true",
        help="serve as a Ray Serve application: an ingress and expert replicas on a Ray cluster (APTP_RAY_* "
        "settings, see server/cluster.py; needs pip install '.[ray]')",
    )
    serve.set_defaults(handler=_serve)
