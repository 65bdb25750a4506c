"""The shipped LD-BFR checkpoint (ldbfr.pth); a package so wheels carry it (see ../RECIPE.md)."""
