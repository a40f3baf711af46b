"""Stage crf (see dvc.yaml)."""


def main() -> None:
    raise NotImplementedError("not implemented: stage crf, see issue 4")


if __name__ == "__main__":
    main()
