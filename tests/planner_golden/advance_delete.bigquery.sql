DELETE FROM `audience_sync_planner`.`as_snap_pro_plan_6` WHERE `as_snap_pro_plan_6`.`planner_ref` IN (SELECT `as_chg_pro_plan_7`.`planner_ref` 
FROM `audience_sync_planner`.`as_chg_pro_plan_7`)
