"""Stage random_walk (see dvc.yaml)."""


def main() -> None:
    raise NotImplementedError("not implemented: stage random_walk, see issue 4")


if __name__ == "__main__":
    main()
