"""Stage train_aff (see dvc.yaml)."""


def main() -> None:
    raise NotImplementedError("not implemented: stage train_aff, see issue 4")


if __name__ == "__main__":
    main()
