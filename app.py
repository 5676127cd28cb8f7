"""The web app: image search, kNN labels and anomaly verdicts on an index folder.

    python app.py --index runs/fashion-mnist/index [--host 127.0.0.1] [--port 7860] [--auth user:pass]

Same app as ``retrieval serve``; without ``--index`` it opens the README demo's index.
"""

import argparse

from retrieval.webapp import launch

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default=None, help="index folder (default: runs/fashion-mnist/index)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, help="user:password required to use the app")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    try:
        launch(args.index, host=args.host, port=args.port, auth=args.auth, share=args.share, device=args.device)
    except Exception as exc:  # a user's mistake (no such index, bad --auth): one line, no traceback
        from retrieval.webapp import USER_ERRORS

        if not isinstance(exc, USER_ERRORS):
            raise
        raise SystemExit(f"error: {exc}") from None
