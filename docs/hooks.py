"""mkdocs hook: the notebooks live in colab/ (where Colab and the tests find them), outside
docs/; this adds each colab/*.ipynb to the site as the page colab/<name>/ before mkdocs-jupyter
turns .ipynb files into pages (hence the higher priority). The build shows them as committed,
outputs included, and never executes them."""
import glob
import os

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@event_priority(100)
def on_files(files, config):
    for path in sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb"))):
        files.append(File(f"colab/{os.path.basename(path)}", src_dir=ROOT,
                          dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
