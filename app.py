"""The web app: image search, kNN labels and anomaly verdicts on an index folder.

    python app.py [INDEX] [--host 127.0.0.1] [--port 7860] [--auth user:pass]   (= retrieval serve:
                                                      the app and the JSON API under /api/v1)
    gradio app.py                                     (reload mode, the app alone; the index from $RETRIEVAL_INDEX)


Without an index it opens the README demo's, or a page saying how to build one.
"""

import os
import sys

if __name__ == "__main__":
    from retrieval.cli import main

    main(["serve", *sys.argv[1:]])  # `retrieval serve` is the one parser of the app's options
else:  # `gradio app.py` imports this file and serves `demo`
    from retrieval.web import build_app

    demo, allowed_paths = build_app(os.environ.get("RETRIEVAL_INDEX"), device=os.environ.get("RETRIEVAL_DEVICE", "auto"))
