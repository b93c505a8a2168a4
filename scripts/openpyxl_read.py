"""Reads every cell of an xlsx with openpyxl in read-only mode, for scale beside the
import (scripts/bench-sheets runs it). Prints the rows and cells it saw."""
import sys

import openpyxl

workbook = openpyxl.load_workbook(sys.argv[1], read_only=True, data_only=True)
rows = cells = 0
for sheet in workbook.worksheets:
    for row in sheet.iter_rows(values_only=True):
        rows += 1
        cells += sum(1 for value in row if value is not None)
print(f"{rows} rows, {cells} non-empty cells")
