"""Stage train_seg (see dvc.yaml)."""


def main() -> None:
    raise NotImplementedError("not implemented: stage train_seg, see issue 5")


if __name__ == "__main__":
    main()
