"""``sparsekd-deploy report``: one self-contained HTML page (and a Markdown twin) on a run or a bundle."""
