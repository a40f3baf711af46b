"""Stage train_cam (see dvc.yaml)."""


def main() -> None:
    raise NotImplementedError("not implemented: stage train_cam, see issue 3")


if __name__ == "__main__":
    main()
