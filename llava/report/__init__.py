"""llava.report: self-contained HTML pages of what a run did (``llava eval --report``, ``llava data check --report``).

Each page is one HTML file with its CSS and script inline and its thumbnails in an ``images/`` folder beside it, so
it opens from disk with no network. Only the commands import this package; it reads data and eval results.
"""
