"""``python3 -m khibernate.image ...``: the image commands alone (what a capture environment runs; starts faster)."""

from khibernate.image.cli import image_group

if __name__ == "__main__":
    image_group(prog_name="khibernate image")
