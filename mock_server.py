"""The Arterys-style mock server: every handler, mocks included, on Flask's development server.

    python mock_server.py            # every handler, mocks included; a bare POST / gets the 3D mask
    python mock_server.py -s3D       # only the 3D probability mask mock, on POST /
    python mock_server.py -b         # only bounding boxes (-s2D: 2D masks, -cl: classification)

Production serves ``server.create_app()`` under gunicorn (``gunicorn -c gunicorn.conf.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from inference.config import get_settings
from server import create_app

#: mock_server.py flags (as in the Arterys SDK's mock server) and the command each one serves.
MODE_FLAGS = {
    "-s2D": "get-probability-mask-2d",
    "-s3D": "get-probability-mask",
    "-b": "get-bounding-box-2d",
    "-cl": "get-classification",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python mock_server.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_mutually_exclusive_group()
    for flag, command in MODE_FLAGS.items():
        modes.add_argument(flag, dest="mode", action="store_const", const=command, help=f"serve only {command}")
    settings = get_settings()
    parser.add_argument("--host", default=settings.host, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (default %(default)s)")
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (never in production)")
    args = parser.parse_args(argv)
    # the development server serves the mocks too, and answers a bare POST / with the 3D mock as before
    settings = dataclasses.replace(settings, enable_mocks=True,
                                   default_command=settings.default_command or MODE_FLAGS["-s3D"])
    app = create_app(args.mode, settings)
    app.run(host=args.host, port=args.port, debug=args.debug, use_reloader=False, threaded=True)


if __name__ == "__main__":
    main()
