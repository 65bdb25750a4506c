"""The shipped ented checkpoint (ented.pth); a package so wheels carry it (see ../RECIPE.md)."""
