"""The HTML report of a results folder: figures (`figures`) and the page that holds them (`page`)."""
