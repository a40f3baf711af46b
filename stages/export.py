"""Stage export (see dvc.yaml)."""


def main() -> None:
    raise NotImplementedError("not implemented: stage export, see issue 5")


if __name__ == "__main__":
    main()
