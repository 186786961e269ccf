"""The SCER rating: categories and grades, the submissions book, the standard benchmark, the label and its manifest."""
