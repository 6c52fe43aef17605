"""Small public cases shipped with the package, each with its licence and attribution."""
