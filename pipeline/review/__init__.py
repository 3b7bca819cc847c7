"""A local web page for reviewing a captioned table: previews, captions, filters and good/bad verdicts.

``python -m pipeline.review TABLE`` reads the table once, filters and pages it on the server (so a
100k-row table never travels to the browser), makes frame-strip previews on demand in decoder
processes with a time limit, and keeps the reviewer's verdicts in a sidecar file, never in the table.
"""
