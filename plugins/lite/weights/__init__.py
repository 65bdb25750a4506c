"""The shipped lite checkpoint (lite.pth); a package so wheels carry it (see ../RECIPE.md)."""
