"""Federation scenarios and the runner that hands them to Flower."""
