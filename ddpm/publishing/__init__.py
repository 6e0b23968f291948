"""Publishing a trained pipeline: what an upload stages (the pipeline's own files) and its model card, with the
scores the run measured.

Uses models/, sampling/ and evaluation/; the Hub calls themselves are the upload job's."""
